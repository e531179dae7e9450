"""The training plan printed at start: N, D, C, steps, batch, LR — and stored with the run.

Training length comes from (in order) ``train.max_steps``, a FLOP budget ``train.flops``, or
tokens = ``train.tokens_per_param`` × parameters (Chinchilla: 20). For a mixture-of-experts
model "parameters" in tokens/param, FLOPs and MFU are the *active* ones (those a token
multiplies with, kiln.planning.moe); the total is printed beside them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kiln.config import JobConfig
from kiln.planning.hardware import device_peak, resolve_precision
from kiln.planning.moe import flops_per_token
from kiln.planning.plan import default_warmup_steps


@dataclass
class TrainingPlan:
    params: int
    non_embedding_params: int
    active_params: int
    """Parameters one token uses (= params for a dense model)."""
    steps: int
    tokens: int
    flops: float
    flops_per_token: float
    length_from: str
    batch_size: int
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    world_size: int
    lr: float
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    precision: str
    device: str
    peak_flops: float
    peak_source: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        tokens_per_step = self.batch_size * self.seq_len
        sparse = self.active_params != self.params
        active = f"; {self.active_params:,} active per token" if sparse else ""
        n = "active N" if sparse else "N"
        per = "tokens/active param" if sparse else "tokens/param"
        return "\n".join(
            [
                "plan:",
                f"  parameters  {self.params:,} ({self.non_embedding_params:,} non-embedding"
                f"{active})",
                f"  tokens      {self.tokens:,} = {self.steps:,} steps × {tokens_per_step:,} "
                f"tokens/step ({self.tokens / self.active_params:.2f} {per}; length from "
                f"{self.length_from})",
                f"  compute     {self.flops:.3e} FLOPs ({self.flops_per_token:.3e} per token, "
                f"6N + 12·L·S·d with {n}; MFU uses the same)",
                f"  batch       {self.batch_size} sequences × {self.seq_len} tokens; "
                f"{self.world_size} rank(s) × micro-batch {self.micro_batch_size} × "
                f"{self.grad_accum} accumulation step(s)",
                f"  lr          peak {self.lr:g}, {self.warmup_steps} warm-up steps, {self.decay} "
                f"decay to {self.min_lr_ratio:g}× peak",
                f"  device      {self.device}, {self.precision}; peak {self.peak_flops:.3e} FLOP/s "
                f"({self.peak_source})",
            ]
        )


def loop_plan(steps: int, batch_size: int, micro_batch_size: int, seq_len: int,
              world_size: int = 1) -> TrainingPlan:  # fmt: skip
    """A plan that only sizes the loop — steps, global batch, micro-batch per rank, sequence
    length, ranks — for code that drives the Trainer without a job (the memory probe, tests).
    Parameters, FLOPs (1 per token, peak 1 FLOP/s: MFU is then tokens/s ÷ ranks) and the LR
    fields are placeholders: the LR schedule is its own part."""
    tokens = steps * batch_size * seq_len
    return TrainingPlan(
        params=0, non_embedding_params=0, active_params=0, steps=steps, tokens=tokens,
        flops=float(tokens), flops_per_token=1.0, length_from="train.max_steps",
        batch_size=batch_size, micro_batch_size=micro_batch_size,
        grad_accum=max(1, batch_size // (world_size * micro_batch_size)), seq_len=seq_len,
        world_size=world_size, lr=0.0, warmup_steps=0, decay="cosine", min_lr_ratio=0.0,
        precision="fp32", device="cpu", peak_flops=1.0, peak_source="placeholder",
    )  # fmt: skip


def make_training_plan(shape, job: JobConfig, dims, data=None) -> TrainingPlan:
    t = job.train
    seq = job.data.seq_len
    params = shape.num_params(include_embeddings=True)
    active = shape.num_params(include_embeddings=True, active=True)
    per_token = flops_per_token(shape, seq)
    tokens_per_step = t.batch_size * seq
    if t.max_steps is not None:
        steps, length_from = t.max_steps, "train.max_steps"
    elif t.flops is not None:
        steps = math.ceil(t.flops / per_token / tokens_per_step)
        length_from = f"train.flops {t.flops:.3g}"
    else:
        steps = math.ceil(t.tokens_per_param * active / tokens_per_step)
        length_from = f"train.tokens_per_param {t.tokens_per_param:g}"
    steps = max(1, steps)
    micro = t.micro_batch_size or t.batch_size // dims.dp_size
    warmup = t.warmup_steps if t.warmup_steps is not None else default_warmup_steps(steps)
    precision, _ = resolve_precision(t.precision, dims.device.type)  # 'auto' → measured
    peak, source = device_peak(dims.device.type, precision)
    return TrainingPlan(
        params=params,
        non_embedding_params=shape.num_params(include_embeddings=False),
        active_params=active,
        steps=steps,
        tokens=steps * tokens_per_step,
        flops=steps * tokens_per_step * per_token,
        flops_per_token=per_token,
        length_from=length_from,
        batch_size=t.batch_size,
        micro_batch_size=micro,
        grad_accum=t.batch_size // (dims.dp_size * micro),
        seq_len=seq,
        world_size=dims.world_size,
        lr=t.lr,
        warmup_steps=min(warmup, steps),
        decay=t.decay,
        min_lr_ratio=t.min_lr_ratio,
        precision=precision,
        device=str(dims.device),
        peak_flops=peak,
        peak_source=source,
    )
