"""Compute-optimal allocation (Chinchilla: ~20 tokens per parameter) and shapes for a size.

Holds the seven Cerebras-GPT shapes and their published training numbers as plain data, so
planning needs no model import. ``shape_for_params`` interpolates depth and width in log space
between those presets (GPT-3-like aspect ratios), then picks the depth that hits N.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from kiln.errors import ConfigError
from kiln.planning.flops import Shape, param_count


@dataclass(frozen=True)
class PublishedRun:
    """One Cerebras-GPT model as published (model card / Dey et al. 2023, table 1-2)."""

    name: str
    shape: Shape
    params: float
    """Round size in the name (111M …)."""
    params_exact: float
    """Parameter count of the released checkpoint."""
    tokens: float
    flops: float
    batch_size: int
    """Sequences of 2048 tokens per step (13B: 720, later 1080)."""
    lr: float
    pile_loss: float
    """Pile test cross-entropy (nats/token) from the model card."""


def _s(n_layers: int, d: int, heads: int, d_head: int) -> Shape:
    return Shape(n_layers=n_layers, d_model=d, n_heads=heads, d_head=d_head, d_ffn=4 * d)


CEREBRAS_GPT: dict[str, PublishedRun] = {
    r.name: r
    for r in [
        PublishedRun("cerebras-gpt-111m", _s(10, 768, 12, 64), 111e6, 111.05e6,
                     2.22e9, 2.6e18, 120, 6.0e-4, 2.566),
        PublishedRun("cerebras-gpt-256m", _s(14, 1088, 17, 64), 256e6, 256.0e6,
                     5.12e9, 1.3e19, 264, 6.0e-4, 2.299),
        PublishedRun("cerebras-gpt-590m", _s(18, 1536, 12, 128), 590e6, 590.3e6,
                     1.18e10, 6.1e19, 264, 2.0e-4, 2.184),
        PublishedRun("cerebras-gpt-1.3b", _s(24, 2048, 16, 128), 1.3e9, 1.316e9,
                     2.63e10, 2.8e20, 528, 2.0e-4, 1.996),
        PublishedRun("cerebras-gpt-2.7b", _s(32, 2560, 32, 80), 2.7e9, 2.652e9,
                     5.30e10, 1.1e21, 528, 2.0e-4, 1.834),
        PublishedRun("cerebras-gpt-6.7b", _s(32, 4096, 32, 128), 6.7e9, 6.658e9,
                     1.33e11, 6.3e21, 1040, 1.2e-4, 1.704),
        PublishedRun("cerebras-gpt-13b", _s(40, 5120, 40, 128), 13e9, 12.853e9,
                     2.57e11, 2.3e22, 720, 1.2e-4, 1.575),
    ]
}  # fmt: skip

PRESET_SHAPES: dict[str, Shape] = {k: r.shape for k, r in CEREBRAS_GPT.items()}


def tokens_for(params: float, ratio: float = 20.0) -> float:
    """Compute-optimal training tokens: D = ratio · N (Chinchilla / Cerebras-GPT: 20)."""
    _check_positive("params", params)
    _check_positive("tokens_per_param", ratio)
    return float(ratio) * float(params)


def params_for_flops(flops: float, ratio: float = 20.0) -> float:
    """N solving C = 6·N·D with D = ratio·N, i.e. N = sqrt(C / (6·ratio))."""
    _check_positive("flops", flops)
    _check_positive("tokens_per_param", ratio)
    return math.sqrt(float(flops) / (6.0 * float(ratio)))


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} is {value!r} but must be a positive finite number.")


def interp_loglog(x: float, xs: list[float], ys: list[float], extrapolate: bool = True) -> float:
    """Piecewise-linear interpolation of log y against log x (end segments extended or clamped)."""
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    t = math.log(x)
    if not extrapolate and (t <= lx[0] or t >= lx[-1]):
        return ys[0] if t <= lx[0] else ys[-1]
    i = min(max(bisect.bisect_left(lx, t), 1), len(lx) - 1)
    w = (t - lx[i - 1]) / (lx[i] - lx[i - 1])
    return math.exp(ly[i - 1] + w * (ly[i] - ly[i - 1]))


def _preset_curve(attr: str) -> tuple[list[float], list[float]]:
    runs = list(CEREBRAS_GPT.values())
    return [float(param_count(r.shape)) for r in runs], [
        float(getattr(r.shape, attr)) for r in runs
    ]


def shape_for_params(params: float, vocab: int = 50257, seq: int = 2048) -> Shape:
    """A GPT-3-style shape with about ``params`` parameters (embeddings included).

    Width comes from log-log interpolation of d_model against N over the Cerebras-GPT presets,
    rounded to a multiple of d_head (64 below d=1536, else 128, as the presets do); d_ffn = 4d,
    learned positions, tied embeddings, GELU. Depth is then chosen to land closest to N.
    """
    _check_positive("params", params)
    xs, ds = _preset_curve("d_model")
    d_head = 64
    d = max(64, round(interp_loglog(params, xs, ds) / 64) * 64)
    if d >= 1536:
        d_head = 128
        d = round(d / 128) * 128
    base = Shape(n_layers=0, d_model=d, n_heads=d // d_head, d_head=d_head, d_ffn=4 * d,
                 vocab_size=vocab, max_seq_len=seq)  # fmt: skip
    per_layer = param_count(Shape(**{**base.__dict__, "n_layers": 1})) - param_count(base)
    while d > 64 and param_count(base) + per_layer > 1.1 * params:  # vocab-dominated sizes
        d -= d_head
        base = Shape(**{**base.__dict__, "d_model": d, "n_heads": d // d_head, "d_ffn": 4 * d})
        per_layer = param_count(Shape(**{**base.__dict__, "n_layers": 1})) - param_count(base)
    n_layers = max(1, round((params - param_count(base)) / per_layer))
    return Shape(**{**base.__dict__, "n_layers": n_layers})


def default_batch_size(params: float) -> int:
    """Cerebras-GPT-like global batch (sequences of 2048): log-log in N, clamped, multiple of 8."""
    xs = [r.params_exact for r in CEREBRAS_GPT.values()]
    ys = [float(r.batch_size) for r in CEREBRAS_GPT.values()]
    ys[-1] = 1080.0  # 13B ended at 1080 sequences; 720 was its start
    return max(8, round(interp_loglog(params, xs, ys, extrapolate=False) / 8) * 8)


def default_lr(params: float) -> float:
    """Peak LR (standard parametrization): log-log interpolation of the Cerebras-GPT LRs in N.

    6e-4 at ≤256M, 2e-4 for 590M–2.7B, 1.2e-4 at ≥6.7B, smoothly in between, clamped outside.
    """
    runs = list(CEREBRAS_GPT.values())
    return interp_loglog(params, [r.params_exact for r in runs], [r.lr for r in runs], False)
