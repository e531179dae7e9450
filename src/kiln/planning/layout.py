"""Parallel layout planner: which (tp, pp, dp_replicate, dp_shard, schedule, micro-batch,
activation checkpointing) to train a model with on a cluster, and how fast it would run.

Pure arithmetic: nothing here touches torch.distributed. The mesh is laid out as issue-12's
ParallelDims lays it out, ``pp × dp_replicate × dp_shard × tp`` (tp innermost), so a group's
ranks are ``stride`` apart with stride the product of the inner degrees; a group whose ranks
all sit in one node talks over the node's links (NVLink), any other over the per-device NIC.

**Memory per device** (bf16 autocast with fp32 master weights, AdamW): the training peak of
:func:`kiln.train.memory.estimate_layout_memory` — the function `kiln estimate-memory` prints —
on the pipeline rank that needs the most: the stages kiln's pipeline gives it, its parameters,
gradients and optimizer moments split by tp and (FSDP) dp_shard plus one gathered block and
the root module, DDP's buckets, and its activations split by tp/SP times the micro-batches the
schedule keeps in flight (from torch's own schedule order); on a CPU with kiln's default malloc
tuning, plus what the kept heap holds beyond the live tensors (HEAP_KEPT_TRANSIENT, FSDP_CPU_EXTRA).
A layout fits when this is at most ``USABLE`` of the device memory (the estimate leaves out the
CUDA context and the GPU allocator's fragmentation,
and the build transient — this rank's shards plus one block or embedding built whole — which
the estimate reports apart as ``build``).

**Step time** = compute + exposed communication, per device:

* compute: the fused (dataflow: flash attention, fused MLP) step time of one micro-batch of
  the whole model from :func:`kiln.planning.perf.predict` (kernel by kernel on a CPU, where
  kiln trains eagerly), × micro-batches per data-parallel
  rank / (tp · pp); activation checkpointing adds the forward again; the optimizer step is
  perf's AdamW op over the local parameters. The pipeline stretches compute by the bubble:
  GPipe and 1F1B (p−1)/(m+p−1) of the step, interleaved ((p−1)/v)/(m+(p−1)/v), zero-bubble 0.
* TP with sequence parallelism: the collectives kiln's TP plan issues (:func:`_tp_s`): per
  layer and micro-batch one b·s·d gather or scatter per column- and row-parallel linear
  forward and backward, and the norms' partial gradients summed 4 times a step; not
  overlapped.
* every collective: :meth:`Cluster.comm_s` — its kind's measured fit on ``local:N``, else the
  ring cost ((t−1)/t of the message, 2(t−1)/t for an all-reduce) plus the cluster's latency.
* PP: one b·s·d/t bf16 send forward and one backward per micro-batch and virtual stage.
* FSDP: gathers the local parameters (bf16) forward and backward per micro-batch and
  reduce-scatters fp32 gradients once per step, overlapped with compute except one block's
  worth; HSDP/DDP all-reduce fp32 gradients, overlapped with one micro-batch's backward.

Tokens/s, MFU (model FLOPs 6·N_mm + 12·L·S·d per token over peak × devices), and the time and
device-hours to train the plan's tokens follow. Expert parallelism: the enumeration takes an
``ep`` degree only for models with experts (``n_experts`` on the shape); none are in main yet.

The layouts searched (Layout, check_layout, enumerate_layouts, the schedules' bubble and
in-flight micro-batches, parallel_yaml) live in kiln.planning.layout_space; this module
re-exports them and holds the memory and time model and :func:`recommend`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from kiln.errors import ConfigError
from kiln.planning import ops as opsmod
from kiln.planning.cluster import Cluster, local_cluster, make_cluster, parse_cluster
from kiln.planning.hardware import Device
from kiln.planning.layout_space import (  # noqa: F401  (re-exported)
    MICRO_BATCHES,
    SCHEDULES,
    Layout,
    _flags,
    _schedules,
    bubble_fraction,
    check_layout,
    divisors,
    enumerate_layouts,
    in_flight,
    parallel_yaml,
    train_batch,
)
from kiln.planning.ops import StepShape

USABLE = 0.9
"""Fraction of device memory a layout may plan to use."""


# -- memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StageShape:
    """A pipeline stage of a shape, in the form kiln.train.memory reads (GPTConfig fields)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ffn: int
    vocab_size: int
    max_seq_len: int
    activation: str
    norm: str
    bias: bool
    position: str
    tie_embeddings: bool
    stage_params: int

    def num_params(self, include_embeddings: bool = True) -> int:
        return self.stage_params


@lru_cache(maxsize=256)
def stage_shape(shape: Any, pp: int) -> _StageShape:
    """The worst stage: ceil(L/pp) blocks plus the embedding and head parameters."""
    z = opsmod.dims(shape)
    layers = -(-z["L"] // pp)
    n = opsmod.param_count(shape)
    nb = opsmod.block_params(shape)
    return _StageShape(layers, z["d"], z["h"], z["kv"] // z["dh"], z["dh"], z["f"], z["V"],
                       z["S"], z["act"], z["norm"], z["bias"],
                       "learned" if z["learned_pos"] else "rope", z["tied"],
                       n - z["L"] * nb + layers * nb)  # fmt: skip


@lru_cache(maxsize=4096)
def _layout_estimates(
    shape: Any, lay: Layout, seq_len: int, precision: str = "bf16", device: str = "cuda",
    heap_kept: bool = True,
) -> tuple:  # fmt: skip
    """kiln.train.memory.estimate_layout_memory of the layout, one per pipeline rank (the same
    function `kiln estimate-memory` prints), memoised: layouts repeat. ``heap_kept``: the
    malloc tuning in force (kiln.train.malloc.heap_is_kept), part of the memo's key."""
    from kiln.config import ParallelConfig
    from kiln.train.memory import estimate_layout_memory

    cfg = ParallelConfig(tensor=lay.tp, pipeline=lay.pp, data_replicate=lay.dp_replicate,
                         data=lay.data, pipeline_schedule=lay.schedule,
                         microbatches=lay.microbatches if lay.pp > 1 else None,
                         stages_per_rank=lay.stages_per_rank if lay.pp > 1 else None,
                         activation_checkpointing=lay.activation_checkpointing)  # fmt: skip
    world = lay.tp * lay.pp * lay.dp
    return tuple(estimate_layout_memory(shape, seq_len, lay.micro_batch * lay.microbatches,
                                        precision, world, cfg, lay.micro_batch,
                                        device, heap_kept))  # fmt: skip


def layout_memory(
    shape: Any, lay: Layout, seq_len: int, precision: str = "bf16", device: str = "cuda"
) -> dict[str, float]:
    """Bytes per device by component on the pipeline rank with the highest peak, and 'peak'
    (see the module docstring)."""
    from kiln.train.malloc import heap_is_kept

    estimates = _layout_estimates(shape, lay, seq_len, precision, device, heap_is_kept())
    worst = max(estimates, key=lambda e: e.peak)
    keys = (
        "params",
        "grads",
        "grad_buckets",
        "optimizer",
        "optimizer_temps",
        "activations",
        "heap",
    )
    parts = {k: float(getattr(worst, k)) for k in keys}
    parts["host"] = 0.0
    if lay.offload:  # the shards live on the host; the device holds one gathered block
        block = 4 * opsmod.block_params(shape) / lay.tp  # and its unsharded gradient
        parts["host"] = sum(parts[k] for k in ("params", "grads", "optimizer", "optimizer_temps"))
        parts["host"] -= 2 * block
        parts |= {"params": block, "grads": block, "optimizer": 0.0, "optimizer_temps": 0.0}
        resident = parts["params"] + parts["grad_buckets"] + parts["optimizer"] + parts["grads"]
        parts["peak"] = resident + max(parts["activations"], parts["optimizer_temps"])
        parts["peak"] += parts["heap"]
    else:
        parts["peak"] = float(worst.peak)
    return parts


# -- time ----------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _micro_times(
    shape: Any, micro: int, seq_len: int, dev: Device, precision: str = "bf16", fused: bool = True
) -> tuple[float, float]:
    """(whole step, forward) seconds of one micro-batch of the whole model, no optimizer, on
    one device: fused, or kernel by kernel (an eager CPU step)."""
    from kiln.planning.perf import predict

    step = StepShape(batch=micro, seq_len=seq_len, precision=precision, optimizer=False)
    r = predict(shape, step, dev)
    rows = r.fused if fused else r.kbk
    return sum(c.time_s for c in rows), sum(c.time_s for c in rows if c.phase == "fwd")


@lru_cache(maxsize=64)
def _flops_per_token(shape: Any, seq_len: int) -> float:
    return opsmod.model_flops_per_token(shape, seq_len)


def _tp_s(cluster: Cluster, lay: Layout, z: dict, layers: int, act: float) -> float:
    """Seconds of tensor-parallel communication per step, as kiln's TP plan
    (kiln.distributed.tensor_parallel) issues it: each column-parallel linear (q, k, v, the
    MLP's up projection(s)) converts its own input and each row-parallel one (attention out,
    MLP down) its output. With sequence parallelism (kiln's default without a pipeline), per
    layer and micro-batch, a b·s·d all-gather into every column-parallel linear and a
    reduce-scatter out of every row-parallel one forward, and the converse backward, plus the
    head's gather of its input (and its reduce-scatter backward); without it (under PP), an
    all-reduce after every row-parallel linear forward and of every column-parallel input's
    gradient backward. Checkpointing repeats the forward's. Under SP the norms' parameters are
    replicated DTensors whose gradients stay partial sums, and every read of one sums it again:
    4 all-reduces of d fp32 values per norm parameter per step (1 in gradient-norm clipping, 3
    in AdamW's foreach step: counted on a CPU TP2 run). Not overlapped."""
    cols, rows = 3 + (2 if z["act"] == "swiglu" else 1), 2
    ac, per = lay.activation_checkpointing, lay.microbatches * layers
    if lay.pp == 1:
        gathers = per * (cols + rows + ac * cols) + lay.microbatches
        scatters = per * (cols + rows + ac * rows) + lay.microbatches
        gather = cluster.comm_s("all_gather", lay.tp, 1, gathers * act, gathers)
        gather += cluster.comm_s("reduce_scatter", lay.tp, 1, scatters * act, scatters)
        norms = 4 * (2 * layers + 1) * (2 if z["norm"] == "layernorm" and z["bias"] else 1)
        return gather + cluster.comm_s("all_reduce", lay.tp, 1, norms * 4 * z["d"], norms)
    reduces = per * (rows + cols + ac * rows)
    return cluster.comm_s("all_reduce", lay.tp, 1, reduces * act, reduces)


@dataclass
class Prediction:
    """A layout's predicted memory and step time, with the parts of the step."""

    layout: Layout
    memory: dict[str, float]
    fits: bool
    step_s: float
    parts: dict[str, float]
    """Seconds per step: compute, recompute, bubble, optimizer, tp, pp, dp (exposed)."""
    tokens_per_s: float
    mfu: float
    reason: str = ""
    train_s: float | None = None
    device_hours: float | None = None
    cost_usd: float | None = None
    """device_hours × the cluster's price per device-hour (None where no price is known)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.layout.name()
        return d


def predict_layout(
    shape: Any, lay: Layout, cluster: Cluster, seq_len: int, tokens: float | None = None
) -> Prediction:
    """Memory, step time, tokens/s and MFU of ``lay`` (see the module docstring)."""
    from kiln.planning.perf import cost, matmul_peak

    dev, z = cluster.device, opsmod.dims(shape)
    prec = cluster.precision
    elt = 2 if prec == "bf16" else 4  # bytes of an activation / gathered weight
    t_mb, t_fwd = _micro_times(shape, lay.micro_batch, seq_len, dev, prec, cluster.overlaps)
    m, split = lay.microbatches, lay.tp * lay.pp
    compute = m * t_mb / split
    recompute = m * t_fwd / split if lay.activation_checkpointing else 0.0
    stage_layers = -(-z["L"] // lay.pp)
    mem = layout_memory(shape, lay, seq_len, prec, cluster.memory_device)
    n_local = stage_shape(shape, lay.pp).stage_params / lay.tp
    opt = sum(cost(o, dev).time_s for o in opsmod.optimizer_ops(
        int(n_local / lay.dp_shard), StepShape(batch=1, seq_len=1)))  # fmt: skip
    bubble_f = bubble_fraction(lay.schedule, lay.pp, m, lay.stages_per_rank)
    busy = compute + recompute
    bubble = busy * bubble_f / (1 - bubble_f)
    act = lay.micro_batch * seq_len * z["d"] * elt  # one b·s·d activation
    parts = {"compute": compute, "recompute": recompute, "bubble": bubble, "optimizer": opt}
    parts["tp"] = _tp_s(cluster, lay, z, stage_layers, act)
    inner, sends = lay.tp * lay.dp, 2 * m * lay.stages_per_rank
    parts["pp"] = cluster.comm_s("send", 2, inner, sends * act / lay.tp, sends) * (lay.pp > 1)
    parts["dp"] = _dp_s(cluster, lay, n_local, busy, stage_layers, t_mb - t_fwd)
    parts["offload"] = 0.0
    if lay.offload:
        parts["optimizer"], parts["offload"] = _offload_s(cluster, n_local / lay.dp_shard, m,
                                                          busy, stage_layers)  # fmt: skip
    step = sum(parts.values())
    global_tokens = lay.dp * lay.micro_batch * m * seq_len
    tps = global_tokens / step
    flops = _flops_per_token(shape, seq_len) * global_tokens
    mfu = flops / (step * cluster.world * matmul_peak(dev, prec))
    fits = mem["peak"] <= USABLE * cluster.memory_bytes
    if lay.offload:
        fits = fits and mem["host"] <= USABLE * (cluster.host_memory_bytes or 0.0)
    p = Prediction(lay, mem, fits, step, parts, tps, mfu)
    if tokens:
        p.train_s = tokens / tps
        p.device_hours = p.train_s * cluster.world / 3600
        if cluster.price_per_hour:
            p.cost_usd = p.device_hours * cluster.price_per_hour
    return p


def _dp_s(
    cluster: Cluster, lay: Layout, n_local: float, busy: float, layers: int, bwd_mb: float
) -> float:
    """Exposed seconds of data-parallel communication: FSDP's gathers (forward and backward
    per micro-batch, compute precision) and one fp32 reduce-scatter per step per module (the
    blocks and the root), exposed beyond the compute plus one block's share; HSDP's and DDP's
    fp32 all-reduce (one per 25 MB bucket) beyond one micro-batch's backward. On a CPU none
    of it overlaps. Each collective also costs the cluster's latency."""
    m, t, split = lay.microbatches, lay.tp, lay.tp * lay.pp
    elt = 2 if cluster.precision == "bf16" else 4
    dp_s = 0.0
    if lay.data == "fsdp" and lay.dp_shard > 1:
        s = lay.dp_shard
        comm = cluster.comm_s("all_gather", s, t, 2 * m * elt * n_local, (layers + 1) * 2 * m)
        comm += cluster.comm_s("reduce_scatter", s, t, 4 * n_local, layers + 1)
        dp_s += (max(0.0, comm - busy) + comm / (layers * 2 * m + 1) if cluster.overlaps
                 else comm)  # fmt: skip
    ar_ranks = lay.dp_replicate if lay.data == "fsdp" else lay.dp
    if ar_ranks > 1:
        shard = n_local / (lay.dp_shard if lay.data == "fsdp" else 1)
        stride = t * (lay.dp_shard if lay.data == "fsdp" else 1)
        calls = (layers + 1) if lay.data == "fsdp" else math.ceil(4 * shard / 25e6)
        ar = cluster.comm_s("all_reduce", ar_ranks, stride, 4 * shard, calls)
        dp_s += max(0.0, ar - bwd_mb / split) if cluster.overlaps else ar
    return dp_s


def _offload_s(
    cluster: Cluster, n_shard: float, m: int, busy: float, layers: int
) -> tuple[float, float]:
    """(optimizer, transfer) seconds of a step under FSDP2 CPU offload: AdamW on the host
    (28 bytes per local parameter at the host's DRAM bandwidth, as the device's fused AdamW
    reads p, g, m, v and writes p, m, v); each gather copies the fp32 shard host → device,
    forward and backward per micro-batch, overlapped with compute as FSDP's gathers are
    (except one block's worth), and the gradient shard goes back once per step, exposed."""
    if not cluster.host_link_bw or not cluster.host_bw:
        raise ConfigError(f"{cluster.device.name} has no host link in the hardware table, so "
                          "CPU offload cannot be planned for it.")  # fmt: skip
    h2d = 2 * m * 4 * n_shard / cluster.host_link_bw
    exposed = max(0.0, h2d - busy) + h2d / (layers * 2 * m + 1)
    return 28 * n_shard / cluster.host_bw, exposed + 4 * n_shard / cluster.host_link_bw


def _reason(p: Prediction, best: Prediction, cluster: Cluster) -> str:
    """One line: what the layout loses its time to, and whether memory binds it."""
    labels = {"bubble": "pipeline bubble", "tp": "TP communication", "pp": "PP send/recv",
              "dp": "data-parallel communication", "recompute": "recomputation (AC)",
              "optimizer": "optimizer step", "offload": "host transfers (CPU offload)"}  # fmt: skip
    worst = max(labels, key=lambda k: p.parts[k])
    share = p.parts[worst] / p.step_s
    head = ("fastest" if p is best else
            f"{p.step_s / best.step_s - 1:.0%} slower than #1")  # fmt: skip
    line = f"{head}; largest overhead {labels[worst]} {share:.0%} of the step"
    used = p.memory["peak"] / cluster.memory_bytes
    if used > 0.75 * USABLE:
        line += f"; memory-bound ({used:.0%} of device memory)"
    return line


def recommend(
    shape: Any,
    cluster: Cluster,
    global_batch: int,
    seq_len: int,
    tokens: float | None = None,
    top: int = 5,
    **fixed,
) -> list[Prediction]:
    """The ``top`` fastest layouts that fit, best first, each with its reason. Raises a
    one-sentence ConfigError when no layout fits (with the memory the leanest one needs)."""
    offload = cluster.host_link_bw is not None and cluster.memory_device != "cpu"
    layouts = enumerate_layouts(shape, cluster.world, global_batch, offload=offload, **fixed)
    if not layouts:
        raise ConfigError(f"no layout of {cluster.world} devices divides global batch "
                          f"{global_batch} with the given degrees; choose a global batch that "
                          f"is a multiple of {cluster.world}.")  # fmt: skip
    preds = [predict_layout(shape, lay, cluster, seq_len, tokens) for lay in layouts]
    ok = sorted((p for p in preds if p.fits), key=lambda p: p.step_s)
    if not ok:
        lean = min(preds, key=lambda p: p.memory["peak"])
        raise ConfigError(
            f"no layout fits: the leanest ({lean.layout.name()}) needs "
            f"{lean.memory['peak'] / 1e9:,.1f} GB per device but {cluster.device.name} has "
            f"{cluster.memory_bytes / 1e9:g} GB ({USABLE:.0%} usable); add devices or use "
            "larger ones."
        )
    for p in ok[:top]:
        p.reason = _reason(p, ok[0], cluster)
    return ok[:top]


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def format_recommendation(preds: list[Prediction], cluster: Cluster, header: str) -> str:
    """Aligned table of the best layouts, with the reason under each."""
    lines = [header, f"cluster: {cluster.describe()}", "",
             f"{'#':>2}  {'layout':<52}{'step s':>9}{'tok/s':>12}{'MFU':>7}{'GB/dev':>8}"
             f"{'train days':>11}{'dev-hours':>11}{'cost $':>13}"]  # fmt: skip
    for i, p in enumerate(preds, 1):
        days = f"{p.train_s / 86400:,.1f}" if p.train_s else "-"
        hours = f"{p.device_hours:,.0f}" if p.device_hours else "-"
        usd = f"{p.cost_usd:,.0f}" if p.cost_usd else "-"
        lines.append(f"{i:>2}  {p.layout.name():<52}{p.step_s:>9.3f}{p.tokens_per_s:>12,.0f}"
                     f"{p.mfu:>7.1%}{_gb(p.memory['peak']):>8}{days:>11}{hours:>11}"
                     f"{usd:>13}")  # fmt: skip
        lines.append(f"    {p.reason}")
    return "\n".join(lines)


__all__ = ["SCHEDULES", "Cluster", "Layout", "Prediction", "bubble_fraction", "check_layout",
           "enumerate_layouts", "format_recommendation", "in_flight", "layout_memory",
           "local_cluster", "make_cluster", "parallel_yaml", "parse_cluster", "predict_layout",
           "recommend", "stage_shape", "train_batch"]  # fmt: skip
