"""The layouts the parallel planner (kiln.planning.layout) considers: the :class:`Layout`
dataclass, which (tp, pp, dp, ep, schedule, micro-batch, activation checkpointing, offload)
combinations are valid for a model and a cluster (:func:`check_layout`,
:func:`enumerate_layouts`), pipeline-schedule arithmetic (:func:`bubble_fraction`,
:func:`in_flight`) and a layout as ``kiln train`` config (:func:`parallel_yaml`,
:func:`train_batch`). Pure arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kiln.errors import ConfigError
from kiln.planning import ops as opsmod

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")
"""Pipeline schedules the planner models (names as parallel.pipeline_schedule spells them)."""
MICRO_BATCHES = tuple(range(1, 17))
"""Micro-batch sizes tried (those dividing the batch of a data-parallel rank)."""


# -- layouts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One way to spread the run; tp·pp·dp_replicate·dp_shard·ep = world size."""

    tp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    micro_batch: int
    microbatches: int
    """Micro-batches per step per data-parallel rank (the pipeline's m)."""
    schedule: str = "1F1B"
    stages_per_rank: int = 1
    activation_checkpointing: bool = False
    data: str = "fsdp"
    """'fsdp' (sharded over dp_shard, HSDP with dp_replicate) or 'ddp' (dp_shard = 1)."""
    ep: int = 1
    offload: bool = False
    """FSDP2 CPU offload: sharded parameters, gradients and AdamW state in host memory."""

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def name(self) -> str:
        s = f"TP{self.tp} PP{self.pp}"
        if self.pp > 1:
            v = f" v{self.stages_per_rank}" if self.stages_per_rank > 1 else ""
            s += f" {self.schedule}{v} m{self.microbatches}"
        dp = (f"DDP{self.dp}" if self.data == "ddp" else
              f"HSDP{self.dp_replicate}×{self.dp_shard}" if self.dp_replicate > 1 else
              f"FSDP{self.dp_shard}")  # fmt: skip
        ac = " +AC" if self.activation_checkpointing else ""
        return f"{s} {dp} mb{self.micro_batch}{ac}{' +offload' if self.offload else ''}"


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_layout(
    shape: Any, lay: Layout, world: int, global_batch: int, tied_pp: bool = False
) -> str | None:
    """Why ``lay`` is not a valid layout of ``shape`` (None if it is)."""
    z = opsmod.dims(shape)
    kv_heads = z["kv"] // z["dh"]
    if lay.tp * lay.pp * lay.dp * lay.ep != world:
        return f"tp·pp·dp·ep = {lay.tp * lay.pp * lay.dp * lay.ep} is not the world {world}"
    for what, n in (("heads", z["h"]), ("kv heads", kv_heads), ("d_ffn", z["f"])):
        if n % lay.tp:
            return f"tp {lay.tp} does not divide {what} {n}"
    if lay.pp * lay.stages_per_rank > z["L"]:
        return f"{lay.pp * lay.stages_per_rank} pipeline stages exceed {z['L']} layers"
    if lay.pp > 1 and z["tied"] and not tied_pp:
        return "kiln's pipeline refuses tied embeddings"
    if global_batch != lay.dp * lay.micro_batch * lay.microbatches:
        return (f"global batch {global_batch} is not dp {lay.dp} × micro-batch "
                f"{lay.micro_batch} × {lay.microbatches} micro-batches")  # fmt: skip
    if lay.pp > 1 and lay.microbatches < lay.pp:
        return f"{lay.microbatches} micro-batches are fewer than {lay.pp} stages"
    if lay.schedule == "Interleaved1F1B" and lay.microbatches % lay.pp:
        return f"interleaved 1F1B needs micro-batches divisible by pp {lay.pp}"
    if lay.data == "ddp" and lay.dp_shard != 1:
        return "ddp has no shard degree"
    if lay.offload and (lay.data != "fsdp" or lay.dp_shard == 1):
        return "CPU offload is FSDP2's: it needs data fsdp over at least 2 shards"
    if lay.ep > 1 and lay.ep > getattr(shape, "n_experts", 0):
        return f"ep {lay.ep} needs a model with at least {lay.ep} experts"
    return None


def enumerate_layouts(
    shape: Any,
    world: int,
    global_batch: int,
    *,
    tp: int | None = None,
    pp: int | None = None,
    dp_replicate: int | None = None,
    tied_pp: bool = False,
    offload: bool = False,
) -> list[Layout]:
    """Every valid layout (check_layout is None), optionally with fixed degrees; with
    ``offload``, each FSDP layout also with CPU offload."""
    fixed = [d for d in (tp, pp, dp_replicate) if d]
    if fixed and world % math.prod(fixed):
        names = " × ".join(
            f"{n} {d}"
            for n, d in (("tensor", tp), ("pipeline", pp), ("data_replicate", dp_replicate))
            if d
        )
        raise ConfigError(f"parallel {names} = {math.prod(fixed)} does not divide the "
                          f"cluster's {world} devices.")  # fmt: skip
    out = []
    experts = getattr(shape, "n_experts", 0) or 0
    for ep in [e for e in divisors(world) if e == 1 or e <= experts]:
        for t in [tp] if tp else divisors(world // ep):
            for p in [pp] if pp else divisors(world // (ep * t)):
                dp = world // (ep * t * p)
                if dp * ep * t * p != world:
                    continue
                reps = [dp_replicate] if dp_replicate else divisors(dp)
                for r in reps:
                    if dp % r:
                        continue
                    for data in ("fsdp", "ddp"):
                        shard = 1 if data == "ddp" else dp // r
                        rep = dp if data == "ddp" else r
                        if data == "ddp" and (dp == 1 or dp_replicate not in (None, 1, dp)):
                            continue  # ddp writes data_replicate 1; one rank is fsdp's
                        if data == "fsdp" and shard == 1 and dp > 1:
                            continue  # replicas of unsharded weights: that is ddp
                        for mb in MICRO_BATCHES:
                            if global_batch % (dp * mb):
                                continue
                            m = global_batch // (dp * mb)
                            for sched, v in _schedules(p):
                                for ac, off in _flags(offload and data == "fsdp"):
                                    lay = Layout(t, p, rep, shard, mb, m, sched, v, ac, data, ep,
                                                 off)  # fmt: skip
                                    if check_layout(shape, lay, world, global_batch,
                                                    tied_pp) is None:  # fmt: skip
                                        out.append(lay)
    return sorted(set(out), key=lambda x: x.name())


def _flags(offload: bool) -> list[tuple[bool, bool]]:
    """(activation checkpointing, CPU offload) combinations tried."""
    return [(ac, off) for ac in (False, True) for off in ((False, True) if offload else (False,))]


def _schedules(pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1F1B", 1)]
    return [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2)]


def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Fraction of the step the pipeline idles: (p−1)/(m+p−1), interleaved with (p−1)/v in
    place of p−1, zero-bubble 0."""
    if pp == 1 or schedule == "ZBVZeroBubble":
        return 0.0
    idle = (pp - 1) / (stages_per_rank if schedule == "Interleaved1F1B" else 1)
    return idle / (microbatches + idle)


def in_flight(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Micro-batches whose stage activations the first stage holds at its peak."""
    if pp == 1:
        return 1.0
    if schedule == "GPipe":
        return float(microbatches)
    if schedule == "Interleaved1F1B":
        return pp + (pp - 1) / stages_per_rank
    return float(min(pp, microbatches))


def parallel_yaml(lay: Layout) -> str:
    """The ``parallel:`` section for kiln train (issue-12's ParallelConfig names)."""
    import yaml

    sec: dict[str, Any] = {
        "data": lay.data, "tensor": lay.tp, "pipeline": lay.pp,
        "data_replicate": lay.dp_replicate if lay.data == "fsdp" else 1,
        "activation_checkpointing": lay.activation_checkpointing,
    }  # fmt: skip
    if lay.pp > 1:
        sec |= {"pipeline_schedule": lay.schedule, "microbatches": lay.microbatches,
                "stages_per_rank": lay.stages_per_rank}  # fmt: skip
    if lay.offload:
        sec["cpu_offload"] = True
    batch = train_batch(lay)
    note = (
        f"# with train.batch_size {batch['batch_size']} and train.micro_batch_size "
        f"{batch['micro_batch_size']} (the batch this layout was planned for)\n"
    )
    return note + yaml.safe_dump({"parallel": sec}, sort_keys=False)


def train_batch(lay: Layout) -> dict[str, int]:
    """The train section matching ``lay``: global batch and micro-batch size."""
    return {"batch_size": lay.dp * lay.micro_batch * lay.microbatches,
            "micro_batch_size": lay.micro_batch}  # fmt: skip
