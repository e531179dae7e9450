"""The vocabulary of the op-level step description (kiln.planning.ops): :class:`Tensor`,
:class:`Op` and :class:`StepShape`, the shape helpers every count reads (:func:`dims`,
:func:`norm_params`), and ``_Builder`` / ``_ew``, which append an op's forward row and its
backward rows (the FLOP constants of element-wise ops are ``_EW``). Pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PHASES = ("fwd", "bwd", "opt")
KINDS = ("matmul", "attention", "softmax", "norm", "activation", "elementwise", "cast",
         "copy", "embedding", "loss", "optimizer", "fused")  # fmt: skip
_EW = {"layernorm": 8, "rmsnorm": 5, "layernorm_bwd": 14, "rmsnorm_bwd": 9, "gelu": 14,
       "gelu_bwd": 20, "swiglu": 6, "swiglu_bwd": 10, "softmax": 5, "softmax_bwd": 4,
       "rope": 3, "adamw": 15, "loss": 8}  # fmt: skip
"""FLOPs per element of the element-wise ops (erf/tanh/exp counted as a few FLOPs each)."""


@dataclass(frozen=True)
class Tensor:
    """One tensor an op touches: a name unique within its scope, its size and its role."""

    name: str
    bytes: float
    kind: str = "act"
    """'act' (activations and their gradients), 'weight', 'grad' (parameter gradients),
    'state' (optimizer moments)."""


@dataclass(frozen=True)
class Op:
    """One operator of a training step (one instance; ``count`` instances per step)."""

    name: str
    """Dotted, e.g. 'mlp.w1' or 'attn.softmax'; the backward of 'mlp.w1' is 'mlp.w1.dgrad'."""
    kind: str
    """One of KINDS."""
    phase: str
    """'fwd', 'bwd' or 'opt'."""
    flops: float
    """FLOPs of one instance (multiply-add = 2)."""
    reads: tuple[Tensor, ...] = ()
    writes: tuple[Tensor, ...] = ()
    count: int = 1
    """Instances per step (n_layers for a block op)."""
    scope: str = "model"
    """'block' for ops repeated per layer, else 'model'; tensor names are unique per scope."""
    params: int = 0
    """Parameters this op owns (its forward op only), for the parameter count."""
    embedding: bool = False
    """The params are a lookup table (token or position embedding), not a matmul."""
    tied_params: int = 0
    """Weight elements this matmul uses but another op owns (a tied output head)."""
    fuse: str | None = None
    """Fusion group: ops sharing it may keep the tensors they pass between them on chip."""
    sparse: bool = False
    """The op's weight is one of the sparse matrices (its FLOPs and weight bytes scale by ρ)."""
    active_params: int | None = None
    """Of ``params``, those one token multiplies with (routed experts: top_k of E); None = all."""

    @property
    def bytes_read(self) -> float:
        return sum(t.bytes for t in self.reads)

    @property
    def bytes_written(self) -> float:
        return sum(t.bytes for t in self.writes)

    @property
    def bytes(self) -> float:
        """Off-chip bytes of one instance under kernel-by-kernel execution."""
        return self.bytes_read + self.bytes_written

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "phase": self.phase, "flops": self.flops,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "count": self.count, "fuse": self.fuse}  # fmt: skip


@dataclass(frozen=True)
class StepShape:
    """What one step processes: micro-batch, sequence, precision and weight sparsity."""

    batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16"
    """'bf16' (autocast: bf16 compute, fp32 masters and residual) or 'fp32'."""
    density: float = 1.0
    """Kept fraction of the sparse matrices (1 - sparsity)."""
    sparse_attn: bool = True
    """Whether the attention projections are sparse too (Kiln's default include list)."""
    optimizer: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


# -- shape helpers (GPTConfig and planning.flops.Shape both satisfy them) ------------------
def dims(shape: Any) -> dict[str, Any]:
    """The resolved sizes of a shape: d, f, q (= n_heads·d_head), kv, h, L, V, S and flags."""
    d_head = getattr(shape, "d_head", None) or shape.d_model // shape.n_heads
    kv_heads = getattr(shape, "n_kv_heads", None) or shape.n_heads
    return {
        "d": shape.d_model, "f": shape.d_ffn, "h": shape.n_heads, "dh": d_head,
        "q": shape.n_heads * d_head, "kv": kv_heads * d_head, "L": shape.n_layers,
        "V": shape.vocab_size, "S": shape.max_seq_len,
        "bias": bool(getattr(shape, "bias", True)),
        "qkv_bias": bool(getattr(shape, "qkv_bias", False)),
        "qk_norm": getattr(shape, "qk_norm", "none"),
        "act": getattr(shape, "activation", "gelu"),
        "norm": getattr(shape, "norm", "layernorm"),
        "learned_pos": getattr(shape, "position", "learned") == "learned",
        "tied": bool(getattr(shape, "tie_embeddings", True)),
        "parallel": bool(getattr(shape, "parallel_block", False)),
    }  # fmt: skip


def norm_params(shape: Any) -> int:
    """LayerNorm with bias has a scale and a shift; RMSNorm (or no bias) only a scale."""
    z = dims(shape)
    return (2 if z["norm"] == "layernorm" and z["bias"] else 1) * z["d"]


class _Builder:
    """Appends forward ops in order and their backward ops in reverse, per scope."""

    def __init__(self, shape: Any, step: StepShape, scope: str, count: int) -> None:
        self.z, self.step, self.scope, self.count = dims(shape), step, scope, count
        self.shape, self.moe = shape, getattr(shape, "moe", None)
        self.M = step.tokens
        self.a = 2 if step.precision == "bf16" else 4
        self.fwd: list[Op] = []
        self.bwd: list[Op] = []

    def t(self, name: str, elems: float, size: float, kind: str = "act") -> Tensor:
        return Tensor(name, float(elems) * size, kind)

    def op(self, phase: str, name: str, kind: str, flops: float, reads, writes, **kw) -> None:
        o = Op(name, kind, phase, float(flops), tuple(reads), tuple(writes), self.count,
               self.scope, **kw)  # fmt: skip
        (self.fwd if phase == "fwd" else self.bwd).append(o)

    def linear(self, name, x: Tensor, k: int, n: int, y: str, sparse: bool, fuse=None,
               bias=None, tied: bool = False, rows: float | None = None,
               experts: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
        """y = x Wᵀ + b: the forward op now, dgrad and wgrad (and the grad cast) for backward.

        ``experts=(E, top_k)`` makes it a grouped GEMM over E stacked weights (each row of x
        multiplies one expert's W; all E weights are read) on ``rows`` rows (default M)."""
        M, a, z = (self.M if rows is None else rows), self.a, self.z
        E, top_k = experts or (1, 1)
        rho = self.step.density if sparse else 1.0
        b = z["bias"] if bias is None else bias
        w = self.t(f"{name}.w", E * k * n * rho, a, "weight")
        out = self.t(y, M * n, a)
        one = k * n + (n if b else 0)
        params = 0 if tied else E * one
        kw = {"fuse": fuse, "sparse": sparse}
        self.op("fwd", name, "matmul", 2 * M * k * n * rho + (M * n if b else 0), (x, w), (out,),
                params=params, tied_params=k * n if tied else 0,
                active_params=top_k * one if experts else None, **kw)  # fmt: skip
        dy, dx = self.t("d" + y, M * n, a), self.t("d" + x.name, M * k, a)
        dw = self.t(f"{name}.dw", E * k * n * rho, a)
        self.bwd.append([
            Op(f"{name}.wgrad", "matmul", "bwd", 2 * M * k * n * rho, (dy, x), (dw,),
               self.count, self.scope, **kw),
            Op(f"{name}.dgrad", "matmul", "bwd", 2 * M * k * n * rho, (dy, w), (dx,),
               self.count, self.scope, **kw),
        ])  # fmt: skip
        if b:  # the bias gradient is its own reduction kernel over dy (aten::sum on CPU)
            self.bwd[-1].append(Op(f"{name}.bias_grad", "elementwise", "bwd", M * n, (dy,),
                                   (self.t(f"{name}.db", n, a),), self.count, self.scope,
                                   fuse=fuse))  # fmt: skip
        if a != 4:  # the bf16 weight gradient is cast into the fp32 .grad
            self.bwd[-1].append(Op(f"{name}.grad_cast", "cast", "bwd", 0.0, (dw,),
                                   (self.t(f"{name}.grad", E * k * n * rho, 4, "grad"),),
                                   self.count, self.scope))  # fmt: skip
        return out

    def ops(self) -> list[Op]:
        back = [o for group in reversed(self.bwd) for o in group]
        return self.fwd + back


def _ew(b: _Builder, name: str, kind: str, fl: str, ins, out: Tensor, elems: float, **kw):
    """Element-wise op with ``elems`` output elements (FLOP constants from _EW)."""
    per_f, per_b = _EW.get(fl, 1), _EW.get(fl + "_bwd", 1)
    fuse, params = kw.get("fuse"), kw.get("params", 0)
    b.op("fwd", name, kind, per_f * elems, ins, (out,), fuse=fuse, params=params)
    saved = tuple(i for i in ins if i.kind == "act") if kw.get("saves", True) else ()
    grads_in = tuple(Tensor("d" + i.name, i.bytes, "act") for i in ins if i.kind == "act")
    reads = (
        (Tensor("d" + out.name, out.bytes),) + saved + tuple(i for i in ins if i.kind == "weight")
    )
    passes = kw.get("bwd_passes", 1)  # a norm's backward reads dy and x again for dγ, dβ
    reads = tuple(t for t in reads if t.kind != "weight") * (passes - 1) + reads
    b.bwd.append([Op(f"{name}.bwd", kind, "bwd", per_b * elems, reads, grads_in, b.count,
                     b.scope, fuse=fuse)])  # fmt: skip
