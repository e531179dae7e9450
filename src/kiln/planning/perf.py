"""Operator-level performance model: where a training step's time goes on a device, kernel by
kernel (KBK) and fused (dataflow), from the op description in kiln.planning.ops.

Every op takes ``time = max(compute, memory) + overhead``::

    compute  = flops / rate    rate = peak_bf16 · matmul_efficiency for matmuls and attention
                                      matmuls (the fp32 rate in fp32; attention at the device's
                                      measured attention_flops where it has one),
                                      vector_flops otherwise
    memory   = bytes / offchip_bw       (new activations and gradients at fresh_write_bw,
                                         measured on a CPU: eager kernels write new pages)
    overhead = kernel_overhead_s per kernel (0 for the datasheet devices; measured on a CPU)

and is compute-, memory- or overhead-bound by which term wins. The step time is the sum (no overlap
between ops, as an eager KBK step runs). MFU = model FLOPs (6·N_mm + 12·L·S·d per token, the
convention ``kiln plan`` and the trainer use; dense-equivalent for a sparse model) / (step time
× peak).

**Fused execution** (:func:`fused_ops`): the ops of one fusion group (``Op.fuse``: the MLP's
GEMM → GELU → GEMM, attention's scores → softmax → values, norm → cast) become one op. A
tensor whose writer and every reader are in the group stays on chip: it is neither written
nor read off-chip. When the group's backward needs such a tensor (GELU's input, the attention
probabilities) it recomputes it, adding its producer's FLOPs, as flash attention and
SambaNova's fused MLP do. The on-chip memory a fused group needs is the (kept) weights it
reads, which a dataflow machine holds resident, plus its on-chip tensors for a tile of
``tile_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.errors import ConfigError
from kiln.planning import ops as opsmod
from kiln.planning.hardware import Device
from kiln.planning.ops import Op, StepShape

MATMUL_KINDS = ("matmul", "attention")
TILE = 128
"""Tokens a fused group processes at a time (its on-chip tensors are sized for this tile)."""


@dataclass
class OpCost:
    """One op (or fused group) costed on a device; times are per step (× count)."""

    name: str
    kind: str
    phase: str
    count: int
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    onchip_bytes: float = 0.0
    """On-chip memory the fused group needs (0 for a single op)."""
    overhead_s: float = 0.0
    """Fixed per-kernel cost × count (Device.kernel_overhead_s)."""

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def bound(self) -> str:
        if self.overhead_s > max(self.compute_s, self.memory_s):
            return "overhead"
        return "compute" if self.compute_s >= self.memory_s else "memory"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "time_s": self.time_s, "bound": self.bound}


@dataclass
class PerfReport:
    """What ``kiln perf`` prints: per-op costs KBK and fused, and the step totals."""

    model: str
    device: Device
    step: StepShape
    model_flops: float
    """Model FLOPs of one step (kiln plan's convention × tokens)."""
    kbk: list[OpCost]
    fused: list[OpCost]
    notes: list[str] = field(default_factory=list)

    def total(self, rows: list[OpCost], attr: str) -> float:
        return sum(getattr(r, attr) for r in rows)

    @property
    def step_time_kbk(self) -> float:
        return self.total(self.kbk, "time_s")

    @property
    def step_time_fused(self) -> float:
        return self.total(self.fused, "time_s")

    def mfu(self, step_time: float) -> float:
        return self.model_flops / (step_time * matmul_peak(self.device, self.step.precision))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": asdict(self.device), "step": asdict(self.step),
            "tokens": self.step.tokens, "model_flops": self.model_flops,
            "executed_flops_kbk": self.total(self.kbk, "flops"),
            "executed_flops_fused": self.total(self.fused, "flops"),
            "bytes_kbk": self.total(self.kbk, "bytes"),
            "bytes_fused": self.total(self.fused, "bytes"),
            "step_time_kbk_s": self.step_time_kbk, "step_time_fused_s": self.step_time_fused,
            "mfu_kbk": self.mfu(self.step_time_kbk), "mfu_fused": self.mfu(self.step_time_fused),
            "onchip_bytes_needed": max((r.onchip_bytes for r in self.fused), default=0.0),
            "ops_kbk": [r.to_dict() for r in self.kbk],
            "ops_fused": [r.to_dict() for r in self.fused], "notes": self.notes,
        }  # fmt: skip


def matmul_peak(dev: Device, precision: str = "bf16") -> float:
    """The matmul peak a step in ``precision`` runs at: bf16 (tensor/matrix units) or, for
    fp32, the fp32 rate (vector_flops)."""
    if precision == "bf16":
        return dev.peak_bf16
    return dev.vector_flops or dev.peak_bf16


def _rate(kind: str, dev: Device, precision: str = "bf16") -> float:
    if kind == "attention" and dev.attention_flops:
        return dev.attention_flops
    if kind in MATMUL_KINDS:
        return matmul_peak(dev, precision) * dev.matmul_efficiency
    return dev.vector_flops or dev.peak_bf16


def _check_device(dev: Device) -> None:
    missing = [n for n in ("peak_bf16", "offchip_bw") if getattr(dev, n) is None]
    if missing:
        raise ConfigError(
            f"device {dev.name} has no published {' or '.join(missing)}, so step time cannot "
            "be predicted on it (it appears in the on-chip memory panel of docs/dataflow.md)."
        )


def memory_seconds(reads, writes, dev: Device, kind: str = "matmul") -> float:
    """Reads and in-place writes (weights, optimizer state) at the off-chip bandwidth; new
    activations and gradients at the fresh-write bandwidth where the device has one. An
    element-wise kernel (any kind but matmul, attention, optimizer) moves everything at the
    device's fitted element-wise bandwidth where it has one (measured for a CPU)."""
    if dev.elementwise_bw and kind not in (*MATMUL_KINDS, "optimizer", "fused"):
        return (sum(t.bytes for t in reads) + sum(t.bytes for t in writes)) / dev.elementwise_bw
    fresh = dev.fresh_write_bw or dev.offchip_bw
    new = sum(t.bytes for t in writes if t.kind in ("act", "grad"))
    moved = sum(t.bytes for t in reads) + sum(t.bytes for t in writes) - new
    return moved / dev.offchip_bw + new / fresh


def cost(op: Op, dev: Device, precision: str = "bf16") -> OpCost:
    """One op, KBK: compute at its kind's rate, memory as :func:`memory_seconds`. With a
    measured ``attention_flops`` a softmax costs no time of its own: that rate was timed over
    the whole attention path, its softmax included (Device.attention_flops)."""
    if op.kind == "softmax" and dev.attention_flops:
        return OpCost(op.name, op.kind, op.phase, op.count, op.flops * op.count,
                      op.bytes * op.count, 0.0, 0.0)  # fmt: skip
    return OpCost(op.name, op.kind, op.phase, op.count, op.flops * op.count,
                  op.bytes * op.count, op.flops * op.count / _rate(op.kind, dev, precision),
                  memory_seconds(op.reads, op.writes, dev, op.kind) * op.count, 0.0,
                  dev.kernel_overhead_s * op.count)  # fmt: skip


def _unique(tensors) -> list[opsmod.Tensor]:
    seen: dict[str, opsmod.Tensor] = {}
    for t in tensors:
        seen.setdefault(t.name, t)
    return list(seen.values())


def _fuse(ops: list[Op], first: Op, dev: Device, tokens: int, tile: int, prec: str) -> OpCost:
    """The fused op of ``first``'s (scope, group, phase); see the module docstring."""
    scope_ops = [o for o in ops if o.scope == first.scope]
    group = [o for o in scope_ops if o.fuse == first.fuse]
    members = [o for o in group if o.phase == first.phase]
    ids = {id(o) for o in group}
    written = {t.name: o for o in group for t in o.writes}
    inside = {
        name for name in written
        if all(id(o) in ids for o in scope_ops if any(t.name == name for t in o.reads))
    }  # fmt: skip
    reads = [t for o in members for t in o.reads if t.name not in inside]
    writes = [t for o in members for t in o.writes if t.name not in inside]
    compute = sum(o.flops / _rate(o.kind, dev, prec) for o in members)
    flops = sum(o.flops for o in members)
    needed = {t.name for o in members for t in o.reads if t.name in inside}
    recompute = {id(written[n]): written[n] for n in needed if written[n].phase != first.phase}
    for o in recompute.values():  # the backward recomputes what the forward kept on chip
        compute += o.flops / _rate(o.kind, dev, prec)
        flops += o.flops
        reads += [t for t in o.reads if t.name not in inside]
    reads, writes = _unique(reads), _unique(writes)
    moved = sum(t.bytes for t in reads + writes)
    weights = sum(t.bytes for t in reads if t.kind == "weight")
    on_chip = {t.name: t for o in members for t in o.reads + o.writes if t.name in inside}
    onchip = weights + sum(t.bytes for t in on_chip.values()) * min(1.0, tile / tokens)
    n = first.count
    return OpCost(f"{first.fuse} (fused)", "fused", first.phase, n, flops * n, moved * n,
                  compute * n, memory_seconds(reads, writes, dev) * n, onchip,
                  dev.kernel_overhead_s * n)  # fmt: skip


def fused_costs(
    ops: list[Op],
    dev: Device,
    tokens: int,
    tile: int = TILE,
    precision: str = "bf16",
    groups: set[str] | None = None,
) -> list[OpCost]:
    """Costs with every fusion group (or only those in ``groups``: e.g. {"attn"} for an eager
    step whose attention runs in a flash kernel) run as one op, in the order the groups first
    appear; the other ops kernel by kernel."""
    out, done = [], set()
    for o in ops:
        if o.fuse is None or (groups is not None and o.fuse not in groups):
            out.append(cost(o, dev, precision))
            continue
        key = (o.scope, o.fuse, o.phase)
        if key not in done:
            done.add(key)
            out.append(_fuse(ops, o, dev, tokens, tile, precision))
    return out


# -- sparsity a pattern can hold -------------------------------------------------------------
def sparse_shapes(shape: Any, sparse_attn: bool = True) -> list[tuple[str, int, int]]:
    """(name, out, in) of the matrices Kiln makes sparse by default."""
    z = opsmod.dims(shape)
    mats = [("mlp.w1", z["f"], z["d"]), ("mlp.w2", z["d"], z["f"])]
    if z["act"] == "swiglu":
        mats.append(("mlp.w3", z["f"], z["d"]))
    if sparse_attn:
        mats += [("attn.wq", z["q"], z["d"]), ("attn.wk", z["kv"], z["d"]),
                 ("attn.wv", z["kv"], z["d"]), ("attn.wo", z["d"], z["q"])]  # fmt: skip
    return mats


def check_sparsity(shape: Any, sparsity: float, pattern: str = "block", block_size: int = 32):
    """The density (1 - sparsity) if every sparse matrix can hold it in ``pattern``, else a
    one-sentence ConfigError (mirrors kiln.sparsity.masks, without importing torch)."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity {sparsity} must be in [0, 1) (e.g. 0.875).")
    density = 1.0 - sparsity
    if sparsity == 0 or pattern == "unstructured":
        return density
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        if abs(density - n / m) > 1e-9:
            raise ConfigError(f"pattern {pattern} holds sparsity {1 - n / m:g} only, not "
                              f"{sparsity:g}.")  # fmt: skip
        return density
    if pattern.startswith("block"):
        b = int(pattern[5:] or block_size)
        for name, out_f, in_f in sparse_shapes(shape):
            if out_f % b or in_f % b:
                raise ConfigError(
                    f"block size {b} does not divide {name}'s shape [{out_f}, {in_f}]; use a "
                    "block size dividing both."
                )
            per_line = max(out_f, in_f) // b
            kept = density * per_line
            if abs(kept - round(kept)) > 1e-6 or kept < 1:
                raise ConfigError(
                    f"sparsity {sparsity:g} keeps {density * per_line:g} of the {per_line} "
                    f"blocks of size {b} per line of {name}, not a whole number; choose a "
                    "level that is a multiple of 1/" + str(per_line) + "."
                )
        return density
    raise ConfigError(f"pattern {pattern!r} is not 'unstructured', 'N:M' or 'block[N]'.")


def predict(shape: Any, step: StepShape, dev: Device, name: str = "", tile: int = TILE):
    """The :class:`PerfReport` of one training step of ``shape`` on ``dev``."""
    _check_device(dev)
    ops = opsmod.training_ops(shape, step)
    kbk = [cost(o, dev, step.precision) for o in ops]
    fused = fused_costs(ops, dev, step.tokens, tile, step.precision)
    model = opsmod.model_flops_per_token(shape, step.seq_len) * step.tokens
    notes = []
    moe = getattr(shape, "moe", None)
    if moe is not None and moe.experts:
        rows = "dropless" if moe.capacity_factor is None else "capped by the capacity factor"
        notes.append(f"MoE: model FLOPs count active parameters (top-{moe.top_k} of "
                     f"{moe.experts} experts, plus the router); expert GEMMs run on tokens × "
                     f"top_k routed rows ({rows}, balanced routing assumed)")  # fmt: skip
    if step.density < 1:
        notes.append("MFU counts dense-equivalent model FLOPs; the sparse step executes fewer")
    return PerfReport(name, dev, step, model, kbk, fused, notes)


# -- presentation ----------------------------------------------------------------------------
def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def format_report(r: PerfReport) -> str:
    """Per-op table (KBK), fused-group table, and the step totals."""
    s, dev = r.step, r.device
    sparse = "dense" if s.density == 1 else f"{1 - s.density:.2%} sparse"
    lines = [f"{r.model} on {dev.name}: micro-batch {s.batch} × {s.seq_len} tokens, "
             f"{s.precision}, {sparse}",
             f"device: {matmul_peak(dev, s.precision) / 1e12:,.3g} TFLOP/s {s.precision} matmul "
             f"peak at {dev.matmul_efficiency:.0%} efficiency, "
             f"{dev.offchip_bw / 1e9:,.1f} GB/s off-chip ({dev.source})", "",
             f"{'op (kernel by kernel)':<26}{'phase':>6}{'×':>4}{'GFLOP':>11}{'MB moved':>11}"
             f"{'ms':>12}  bound"]  # fmt: skip
    for c in r.kbk:
        lines.append(f"{c.name:<26}{c.phase:>6}{c.count:>4}{c.flops / 1e9:>11,.2f}"
                     f"{_mb(c.bytes):>11}{c.time_s * 1e3:>12,.2f}  {c.bound}")  # fmt: skip
    lines += ["", f"{'fused (dataflow) groups':<26}{'phase':>6}{'×':>4}{'GFLOP':>11}"
                  f"{'MB moved':>11}{'ms':>12}  bound    on-chip MB"]  # fmt: skip
    for c in (c for c in r.fused if c.kind == "fused"):
        lines.append(f"{c.name:<26}{c.phase:>6}{c.count:>4}{c.flops / 1e9:>11,.2f}"
                     f"{_mb(c.bytes):>11}{c.time_s * 1e3:>12,.2f}  {c.bound:<8}"
                     f"{_mb(c.onchip_bytes):>11}")  # fmt: skip
    d = r.to_dict()
    onchip = f"{_mb(dev.onchip_bytes)} MB on {dev.name}" if dev.onchip_bytes else "not managed"
    lines += [
        "",
        f"model FLOPs     {r.model_flops:.4g} per step (6·N_mm + 12·L·S·d per token, as kiln "
        f"plan counts); executed {d['executed_flops_kbk']:.4g} KBK, "
        f"{d['executed_flops_fused']:.4g} fused (recomputation)",
        f"off-chip bytes  {d['bytes_kbk'] / 1e9:,.2f} GB KBK, {d['bytes_fused'] / 1e9:,.2f} GB "
        "fused",
        f"step time       {r.step_time_kbk:.4g} s KBK (MFU {d['mfu_kbk']:.1%}), "
        f"{r.step_time_fused:.4g} s fused (MFU {d['mfu_fused']:.1%})",
        f"on-chip memory  {_mb(d['onchip_bytes_needed'])} MB for the largest fused group "
        f"(weights + a {TILE}-token tile); {onchip}",
    ]  # fmt: skip
    lines += [f"note            {n}" for n in r.notes]
    return "\n".join(lines)


def time_by_kind(rows: list[OpCost]) -> dict[str, float]:
    """Seconds per op kind (fused groups keep the kind 'fused')."""
    out: dict[str, float] = {}
    for c in rows:
        out[c.kind] = out.get(c.kind, 0.0) + c.time_s
    return out


def plot_report(r: PerfReport, out: str, caption: str = "") -> str:
    """Predicted time per op kind, KBK against fused, split into compute- and memory-bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.fsio import save_figure

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, rows in enumerate((r.kbk, r.fused)):
        left = 0.0
        for kind, secs in sorted(time_by_kind(rows).items(), key=lambda kv: -kv[1]):
            ax.barh(i, secs * 1e3, left=left, label=kind if i == 0 or kind == "fused" else None,
                    color=_COLORS.get(kind))  # fmt: skip
            left += secs * 1e3
        ax.text(left, i, f" {left:,.0f} ms", va="center", fontsize=8)
    ax.set_yticks([0, 1], ["kernel by kernel", "fused"])
    ax.set_xlabel("predicted step time (ms)")
    ax.set_title(f"{r.model} on {r.device.name}", fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return str(save_figure(fig, out, caption))


_COLORS = {"matmul": "#4c72b0", "attention": "#55a868", "softmax": "#c44e52", "norm": "#8172b2",
           "activation": "#ccb974", "elementwise": "#64b5cd", "cast": "#937860",
           "copy": "#da8bc3", "embedding": "#8c8c8c", "loss": "#e17c05",
           "optimizer": "#222222", "fused": "#2ca02c"}  # fmt: skip


# -- SambaNova's analysis: one GEMM → GELU → GEMM chain over weight sparsity ----------------
SPARSITIES = (0.0, 0.5, 0.75, 0.875, 0.9375)


@dataclass
class ChainPoint:
    """The MLP chain of one layer (forward + backward) at one sparsity, KBK and fused."""

    sparsity: float
    flops_kbk: float
    bytes_kbk: float
    flops_fused: float
    bytes_fused: float
    onchip_fused: float
    """On-chip bytes the fused forward or backward needs (the larger)."""

    def bandwidth_needed(self, dev: Device, fused: bool) -> float:
        """Off-chip bytes/s that keep the chain compute-bound at the device's matmul rate."""
        f, b = (self.flops_fused, self.bytes_fused) if fused else (self.flops_kbk, self.bytes_kbk)
        return b * dev.peak_bf16 * dev.matmul_efficiency / f

    def time(self, dev: Device, fused: bool) -> float:
        """max(compute, memory) of the chain (both phases) on ``dev``."""
        f, b = (self.flops_fused, self.bytes_fused) if fused else (self.flops_kbk, self.bytes_kbk)
        return max(f / (dev.peak_bf16 * dev.matmul_efficiency), b / dev.offchip_bw)


def mlp_chain(shape: Any, step: StepShape, sparsities=SPARSITIES) -> list[ChainPoint]:
    """GEMM → GELU → GEMM of one layer (the 'mlp' fusion group, forward and backward) at each
    weight sparsity, from the op description; the device enters only through ChainPoint."""
    unit = Device("unit", 1.0, 1.0, 1.0, None, None, "unit rates")
    points = []
    for s in sparsities:
        o = opsmod.training_ops(replace_layers(shape), replace_step(step, 1.0 - s))
        chain = [x for x in o if x.fuse == "mlp"]
        fused = [c for c in fused_costs(o, unit, step.tokens) if c.name == "mlp (fused)"]
        points.append(ChainPoint(s, sum(x.flops for x in chain), sum(x.bytes for x in chain),
                                 sum(c.flops for c in fused), sum(c.bytes for c in fused),
                                 max(c.onchip_bytes for c in fused)))  # fmt: skip
    return points


def replace_layers(shape: Any) -> Any:
    """The shape with one layer (the chain is per layer)."""
    return shape.replace(n_layers=1) if hasattr(shape, "replace") else shape


def replace_step(step: StepShape, density: float) -> StepShape:
    from dataclasses import replace

    return replace(step, density=density, optimizer=False)


# -- one MLP, unfused vs token-tiled (kiln.models.fused_mlp) -----------------------------------
@dataclass(frozen=True)
class _MLPShape:
    """The fields :func:`kiln.planning.ops.dims` reads, for a lone GELU MLP."""

    d_model: int
    d_ffn: int
    n_heads: int = 1
    n_layers: int = 1
    vocab_size: int = 1
    max_seq_len: int = 1


def mlp_costs(tokens: int, d: int, f: int, tile: int | None, dev: Device) -> list[OpCost]:
    """fwd+bwd costs of one dense fp32 GELU MLP with biases: kernel by kernel (``tile`` None,
    the ops of :mod:`kiln.planning.ops`), or token-tiled as kiln.models.fused_mlp runs it.

    Tiled, per tile of n tokens: 3 forward kernels (fc1, GELU, fc2) and 8 backward (fc1
    recomputed, GELU, dW2 += dyᵀg, dg = dy W2, GELU backward, dW1 += dhᵀx, db1, dx = dh W1),
    plus db2 once. Off-chip: x twice, y, dy, dx once each; every tile reads the weights (2 in
    the forward, 3 in the backward) and read-modify-writes both weight gradients; the tile's
    h, g, dg stay in cache, so its element-wise kernels cost their FLOPs (at vector_flops)
    and the kernel overhead, no memory traffic."""
    step = StepShape(batch=1, seq_len=tokens, precision="fp32", optimizer=False)
    if tile is None:
        b = opsmod._Builder(_MLPShape(d, f), step, "mlp", 1)
        opsmod._mlp(b, b.t("x", tokens * d, 4))
        return [cost(o, dev, "fp32") for o in b.ops()]
    n_tiles = -(-tokens // tile)
    mm = matmul_peak(dev, "fp32") * dev.matmul_efficiency
    vec = dev.vector_flops or dev.peak_bf16
    act, w = 4.0 * tokens * d, 4.0 * d * f
    rows = [  # name, kind, flops, off-chip bytes (whole step), kernels
        ("tiled matmuls", "matmul", 7 * 2.0 * tokens * d * f, 5 * act + n_tiles * 9 * w,
         5 * n_tiles),
        ("tiled element-wise", "activation", (2 * 14 + 20 + 1) * tokens * f, 0.0,
         4 * n_tiles),
        ("db2", "elementwise", tokens * d, act, 1),
    ]  # fmt: skip
    return [OpCost(name, kind, "fwd+bwd", 1, fl, by, fl / (mm if kind == "matmul" else vec),
                   by / dev.offchip_bw, 0.0, dev.kernel_overhead_s * k)
            for name, kind, fl, by, k in rows]  # fmt: skip


def predict_mlp(tokens: int, d: int, f: int, tile: int | None, dev: Device | None = None):
    """Predicted fwd+bwd seconds of :func:`mlp_costs` (``dev`` default: this CPU, measured)."""
    if dev is None:
        from kiln.planning.hardware import cpu_device

        dev = cpu_device()
    return sum(c.time_s for c in mlp_costs(tokens, d, f, tile, dev))
