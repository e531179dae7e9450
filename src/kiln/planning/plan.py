"""A training plan: size, data, compute, batch, LR and (given a device) wall-clock time.

Exactly one of ``flops`` (a budget C: N = sqrt(C / (6·ratio))), ``params`` (N) or ``preset``
(a Cerebras-GPT name) fixes the model; tokens = ``tokens_per_param`` × N of the chosen shape.
Batch and peak LR follow the Cerebras-GPT table (log-log interpolation in N, clamped at its
ends); decay is linear to 10% of the peak, as Cerebras-GPT trained, and warm-up is
``default_warmup_steps`` (5% of steps for long runs, as Cerebras-GPT; more for short ones).
``flops`` is the training compute as Cerebras-GPT publishes it (6·N·D plus an attention term,
30·L·S·d per token; see kiln.planning.flops.cerebras_flops_per_token), so the seven presets
reproduce their table; ``flops_model`` is the 6N + 12·L·S·d "model FLOPs" that MFU uses, and
wall-clock = flops_model / (peak × count × MFU). For a mixture-of-experts shape (``shape=`` with
``moe``) N is the *active* parameter count everywhere above (tokens, FLOPs, batch, LR; see
kiln.planning.moe) and the total is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError, closest
from kiln.planning.chinchilla import (
    PRESET_SHAPES,
    default_batch_size,
    default_lr,
    params_for_flops,
    shape_for_params,
)
from kiln.planning.flops import (
    Shape,
    cerebras_flops_per_token,
    flops_per_token,
    param_count,
)
from kiln.planning.hardware import device_peak
from kiln.planning.moe import param_count as moe_param_count


@dataclass
class Plan:
    """Everything ``kiln plan`` prints; ``to_dict()`` is what run metadata stores."""

    shape: Shape
    params: int
    non_embedding_params: int
    active_params: int
    """Parameters one token uses (= params unless the shape is MoE)."""
    tokens: float
    flops: float
    """Training FLOPs in the published Cerebras-GPT convention: (6N + 30·L·S·d) per token."""
    flops_model: float
    """Model FLOPs, 6N + 12·L·S·d per token (the MFU and wall-clock convention)."""
    flops_6nd: float
    """Plain 6·N·D."""
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    schedule: str = "linear"
    min_lr_ratio: float = 0.1
    tokens_per_param: float = 20.0
    flops_budget: float | None = None
    preset: str | None = None
    device: str | None = None
    count: int = 1
    mfu: float = 0.4
    peak_flops: float | None = None
    peak_source: str | None = None
    wall_clock_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (documented keys; see the field docstrings)."""
        keys = ("params", "non_embedding_params", "active_params", "tokens", "flops", "flops_model",
                "flops_6nd", "flops_budget", "steps", "batch_size", "seq_len", "lr",
                "warmup_steps", "schedule", "min_lr_ratio", "tokens_per_param", "preset",
                "device", "count", "mfu", "peak_flops", "peak_source", "wall_clock_s",
                "notes")  # fmt: skip
        d = {k: getattr(self, k) for k in keys}
        d["batch_tokens"] = self.batch_size * self.seq_len
        d["shape"] = self.shape.to_dict()
        return d


WARMUP_FRACTION = 0.05
"""Warm-up as a fraction of training for long runs (Cerebras-GPT's recipe)."""
SHORT_RUN_WARMUP = 25
"""Warm-up steps a short run still gets (at most a quarter of its steps)."""


def default_warmup_steps(steps: int) -> int:
    """Linear warm-up steps when none are given: max(5% of steps, min(steps / 4, 25)), ≥ 1.

    5% alone gives a 20-step run one warm-up step, so its first Adam updates (each ≈ the peak
    LR per weight) arrive at full size and the loss spikes; a quarter of the run, up to 25
    steps, lets short runs learn. From 500 steps on, 5% is larger and the rule is Cerebras-GPT's.
    """
    quarter = min(round(steps / 4), SHORT_RUN_WARMUP)
    return min(steps, max(1, round(WARMUP_FRACTION * steps), quarter))


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} is {value!r} but must be a positive number.")
    if value <= 0:
        raise ConfigError(f"{name} is {value} but must be > 0.")


def _choose_shape(
    flops, params, preset, vocab, seq_len, ratio, shape=None
) -> tuple[Shape, str | None]:
    if shape is not None:  # a named shape from kiln.models.presets (e.g. an MoE one)
        return Shape(**{**shape.__dict__, "vocab_size": vocab, "max_seq_len": seq_len}), preset
    given = [k for k, v in (("flops", flops), ("params", params), ("preset", preset)) if v]
    if len(given) != 1:
        raise ConfigError(
            f"A plan needs exactly one of flops, params or preset but got "
            f"{', '.join(given) if given else 'none'}."
        )
    if preset:
        if preset not in PRESET_SHAPES:
            hint = closest(preset, PRESET_SHAPES)
            names = ", ".join(PRESET_SHAPES)
            raise ConfigError(f"Preset {preset!r} is unknown; use one of {names}{hint}.")
        s = PRESET_SHAPES[preset]
        return Shape(**{**s.__dict__, "vocab_size": vocab, "max_seq_len": seq_len}), preset
    n = params if params else params_for_flops(flops, ratio)
    return shape_for_params(n, vocab=vocab, seq=seq_len), None


def make_plan(
    *,
    flops: float | None = None,
    params: float | None = None,
    preset: str | None = None,
    tokens_per_param: float = 20.0,
    batch_tokens: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    count: int = 1,
    mfu: float = 0.4,
    vocab: int = 50257,
    seq_len: int = 2048,
    precision: str = "bf16",
    shape: Shape | None = None,
) -> Plan:
    """Plan a compute-optimal run (see the module docstring for every rule used); ``shape``
    (with ``preset`` as its name) plans a given shape, MoE ones included."""
    for name, v in (("flops", flops), ("params", params), ("tokens_per_param", tokens_per_param),
                    ("batch_tokens", batch_tokens), ("batch_size", batch_size), ("count", count),
                    ("mfu", mfu), ("vocab", vocab), ("seq_len", seq_len)):  # fmt: skip
        _positive(name, v)
    if mfu > 1:
        raise ConfigError(f"mfu is {mfu} but must be a fraction in (0, 1].")
    if batch_tokens and batch_size:
        raise ConfigError("Give batch_tokens or batch_size, not both.")
    shape, preset_name = _choose_shape(
        flops, params, preset, vocab, seq_len, tokens_per_param, shape
    )
    total = param_count(shape)
    n = moe_param_count(shape, active=True)
    tokens = float(tokens_per_param) * n
    if batch_tokens:
        batch_size = max(1, round(batch_tokens / seq_len))
    batch_size = batch_size or default_batch_size(n)
    notes = []
    if batch_size * seq_len > tokens:
        batch_size = max(1, int(tokens // seq_len))
        notes.append(f"batch reduced to {batch_size} sequences so that at least one step fits")
    steps = max(1, round(tokens / (batch_size * seq_len)))
    plan = Plan(
        shape=shape, params=total, active_params=n,
        non_embedding_params=moe_param_count(shape, include_embeddings=False), tokens=tokens,
        flops=cerebras_flops_per_token(shape, seq_len) * tokens,
        flops_model=flops_per_token(shape, seq_len) * tokens, flops_6nd=6.0 * n * tokens,
        steps=steps,
        batch_size=batch_size, seq_len=seq_len, lr=default_lr(n),
        warmup_steps=default_warmup_steps(steps), tokens_per_param=float(tokens_per_param),
        flops_budget=float(flops) if flops else None, preset=preset_name, count=int(count),
        mfu=float(mfu), notes=notes,
    )  # fmt: skip
    if device:
        plan.device = device
        plan.peak_flops, plan.peak_source = device_peak(device, precision)
        plan.wall_clock_s = plan.flops_model / (plan.peak_flops * count * mfu)
    return plan


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _sci(x: float, digits: int = 3) -> str:
    """1.11e8-style scientific notation (no '+', no leading exponent zeros)."""
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def format_plan(plan: Plan) -> str:
    """Aligned, human-readable plan with units."""
    s = plan.shape
    rows = [
        ("model", plan.preset or "interpolated GPT-3-style shape"),
        ("shape", f"{s.n_layers} layers × d_model {s.d_model} ({s.n_heads} heads × "
                  f"{s.to_dict()['d_head']}), d_ffn {s.d_ffn}, vocab {s.vocab_size}"),
        ("params", f"{_sci(plan.params)} ({_sci(plan.non_embedding_params)} non-embedding)"),
        ("tokens", f"{_sci(plan.tokens)} ({plan.tokens_per_param:g} per parameter)"),
    ]  # fmt: skip
    if plan.active_params != plan.params:
        m = s.moe
        rows[2] = ("params", f"{_sci(plan.params)} total, {_sci(plan.active_params)} active per "
                             f"token ({m.experts} experts, top-{m.top_k}); tokens, FLOPs, batch "
                             "and LR use the active count")  # fmt: skip
        rows[3] = ("tokens", f"{_sci(plan.tokens)} ({plan.tokens_per_param:g} per active "
                             "parameter)")  # fmt: skip
    rows += [
        ("compute", f"{_sci(plan.flops, 2)} FLOPs (6ND + 30·L·S·d per token, as Cerebras-GPT "
                    f"counts); model FLOPs 6N+12LSd {_sci(plan.flops_model, 2)}; "
                    f"6ND {_sci(plan.flops_6nd, 2)}"),
        ("batch", f"{plan.batch_size} × {plan.seq_len} = {plan.batch_size * plan.seq_len:,} "
                  "tokens/step"),
        ("steps", f"{plan.steps:,} (warm-up {plan.warmup_steps:,})"),
        ("lr", f"{plan.lr:.3g} peak, {plan.schedule} decay to {plan.min_lr_ratio:g}× peak"),
    ]  # fmt: skip
    if plan.flops_budget:
        rows.insert(0, ("budget", f"{_sci(plan.flops_budget, 2)} FLOPs (C = 6·N·D)"))
    if plan.wall_clock_s is not None:
        rows.append(("time", f"{_duration(plan.wall_clock_s)} on {plan.count} × {plan.device} "
                             f"at {plan.mfu:.0%} MFU"))  # fmt: skip
        rows.append(("peak", f"{_sci(plan.peak_flops)} FLOP/s per device ({plan.peak_source})"))
    rows += [("note", n) for n in plan.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
