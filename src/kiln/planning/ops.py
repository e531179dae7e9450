"""One training step of a GPT, operator by operator: FLOPs and the bytes each operator moves.

This is the single description of a model that the other numbers derive from: the parameter
count (:func:`param_count`, behind ``GPTConfig.num_params`` and ``planning.flops``), the FLOP
conventions (:func:`model_flops_per_token`, 6·N_mm + 12·L·S·d_attn), the memory estimate's
per-block parameters and the performance model (kiln.planning.perf).

The description is a plain list of :class:`Op` dataclasses, built by :func:`training_ops`:
forward, backward and optimizer, each op with the tensors it reads and writes (name, bytes,
kind). Another kind of block (an MoE router and experts, a layout planner's communication ops)
is another builder function appending more ``Op`` rows; nothing else needs to change.

Conventions, for M = B·T tokens of a micro-batch, with element sizes ``a`` (compute dtype: 2
for bf16 autocast, 4 for fp32), ``r`` = 4 (the residual stream and norms stay fp32 under
autocast) and ``w`` = 4 (fp32 master weights and gradients):

* a linear ``y = x Wᵀ + b`` (W: n × k, density ρ for a sparse W) costs ``2·M·k·n·ρ`` FLOPs
  forward (+ M·n for the bias), and two matmuls backward of the same size each: dgrad
  ``dx = dy W`` and wgrad ``dW = dyᵀ x``; the bias gradient (M·n FLOPs) is its own reduction
  kernel reading dy. It reads x and the
  (kept part of the) compute-dtype copy of W and writes y.
* attention is counted over the full T × T score matrix (``2·M·T·d_attn`` per matmul, as the
  PaLM/Megatron convention does and as the CPU matmul path computes it); the softmax reads and
  writes the B·H·T² scores.
* norms, GELU, softmax, residual adds and casts are element-wise: a handful of FLOPs per element
  (the constants are in ``_EW``) and one read of every input and one write of every output;
  a norm's backward reads dy and x twice (dx, then the dγ/dβ reductions, as the CPU kernel does).
* AdamW (torch's fused step) reads parameter, gradient and both moments and writes three of
  them: 28 bytes per parameter, over the dense tensors (Kiln keeps sparse weights dense with a
  mask).

An op's ``fuse`` names the group it may run fused with (``mlp``: GEMM → GELU → GEMM, ``attn``:
scores → softmax → values, ``attn_in``/``mlp_in``: residual add → norm → cast). A tensor whose
writer and readers all share one group never leaves the chip under fused execution; a
fused backward that reads such a tensor recomputes it (kiln.planning.perf.fused_ops).

The op vocabulary (Tensor, Op, StepShape, dims, norm_params, the builder) lives in
kiln.planning.op_types; this module re-exports it and holds the model's blocks as ops and the
numbers derived from them.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.errors import ConfigError
from kiln.planning.op_types import (  # noqa: F401  (re-exported)
    _EW,
    KINDS,
    PHASES,
    Op,
    StepShape,
    Tensor,
    _Builder,
    _ew,
    dims,
    norm_params,
)


def _norm(b: _Builder, name: str, x: Tensor, fuse: str) -> Tensor:
    """Norm (fp32 under autocast) then, in bf16, the cast of its output for the matmuls."""
    z, M = b.z, b.M
    p = 2 if z["norm"] == "layernorm" and z["bias"] else 1
    w = b.t(f"{name}.w", p * z["d"], 4, "weight")
    out = b.t(f"{name}.out", M * z["d"], 4)
    _ew(
        b,
        name,
        "norm",
        z["norm"],
        (x, w),
        out,
        M * z["d"],
        fuse=fuse,
        params=p * z["d"],
        bwd_passes=2,
    )
    if b.a == 4:
        return out
    low = b.t(f"{name}.out16", M * z["d"], b.a)
    _ew(b, f"{name}.cast", "cast", "cast", (out,), low, 0, fuse=fuse, saves=False)
    return low


def _attention(b: _Builder, x: Tensor) -> Tensor:
    """q, k, v projections, scores → softmax → values, head merge and output projection."""
    z, M, a, T = b.z, b.M, b.a, b.step.seq_len
    sp = b.step.sparse_attn
    qkv_bias = z["bias"] or z["qkv_bias"]
    q = b.linear("attn.wq", x, z["d"], z["q"], "q", sp, bias=qkv_bias)
    k = b.linear("attn.wk", x, z["d"], z["kv"], "k", sp, bias=qkv_bias)
    v = b.linear("attn.wv", x, z["d"], z["kv"], "v", sp, bias=qkv_bias)
    if z["qk_norm"] != "none":
        q, k = _qk_norm(b, q, "q"), _qk_norm(b, k, "kv")
    if not z["learned_pos"]:
        q2, k2 = b.t("q_rope", M * z["q"], a), b.t("k_rope", M * z["kv"], a)
        _ew(b, "attn.rope_q", "elementwise", "rope", (q,), q2, M * z["q"])
        _ew(b, "attn.rope_k", "elementwise", "rope", (k,), k2, M * z["kv"])
        q, k = q2, k2
    scores = b.t("scores", b.step.batch * z["h"] * T * T, a)
    probs = b.t("probs", b.step.batch * z["h"] * T * T, a)
    ctx = b.t("ctx", M * z["q"], a)
    mm = 2.0 * M * T * z["q"]
    b.op("fwd", "attn.scores", "attention", mm, (q, k), (scores,), fuse="attn")
    b.op("fwd", "attn.softmax", "softmax", _EW["softmax"] * scores.bytes / a, (scores,),
         (probs,), fuse="attn")  # fmt: skip
    b.op("fwd", "attn.values", "attention", mm, (probs, v), (ctx,), fuse="attn")
    dctx, dp, ds = b.t("dctx", M * z["q"], a), b.t("dprobs", probs.bytes / a, a), None
    ds = b.t("dscores", scores.bytes / a, a)
    dq, dk, dv = (b.t("d" + t.name, t.bytes / a, a) for t in (q, k, v))
    sc = b.scope
    b.bwd.append([
        Op("attn.values.bwd", "attention", "bwd", 2 * mm, (dctx, probs, v), (dp, dv), b.count,
           sc, fuse="attn"),
        Op("attn.softmax.bwd", "softmax", "bwd", _EW["softmax_bwd"] * probs.bytes / a,
           (dp, probs), (ds,), b.count, sc, fuse="attn"),
        Op("attn.scores.bwd", "attention", "bwd", 2 * mm, (ds, q, k), (dq, dk), b.count, sc,
           fuse="attn"),
    ])  # fmt: skip
    merged = b.t("ctx_merged", M * z["q"], a)
    _ew(b, "attn.merge_heads", "copy", "copy", (ctx,), merged, 0, saves=False)
    return b.linear("attn.wo", merged, z["q"], z["d"], "attn_out", sp)


def _qk_norm(b: _Builder, x: Tensor, width: str) -> Tensor:
    """The q or k norm (GPTConfig.qk_norm): over each head ('head') or the whole width."""
    z, M = b.z, b.M
    n = z["dh"] if z["qk_norm"] == "head" else z[width]
    p = (2 if z["norm"] == "layernorm" and z["bias"] else 1) * n
    w = b.t(f"{x.name}_norm.w", p, 4, "weight")
    out = b.t(f"{x.name}_normed", M * z[width], b.a)
    _ew(b, f"attn.{x.name}_norm", "norm", z["norm"], (x, w), out, M * z[width], params=p,
        bwd_passes=2)  # fmt: skip
    return out


def _mlp(b: _Builder, x: Tensor, name: str = "mlp", width: int | None = None, rows=None,
         experts: tuple[int, int] | None = None, pre: str = "") -> Tensor:  # fmt: skip
    """GEMM → GELU → GEMM (or SwiGLU's two up-projections and gate), fusion group ``name``;
    with ``experts`` the grouped GEMMs of routed experts (biases on w1 and w2 only)."""
    z, a, f = b.z, b.a, width or b.z["f"]
    M = b.M if rows is None else rows
    kw = {"rows": rows, "experts": experts}
    sparse = experts is None  # MoE refuses sparsity (kiln.sparsity)
    h = b.linear(f"{name}.w1", x, z["d"], f, pre + "h", sparse, name, **kw)
    g = b.t(pre + "g", M * f, a)
    if z["act"] == "swiglu":
        bias = False if experts else None
        u = b.linear(f"{name}.w3", x, z["d"], f, pre + "u", sparse, name, bias=bias, **kw)
        _ew(b, f"{name}.swiglu", "activation", "swiglu", (h, u), g, M * f, fuse=name)
    else:
        _ew(b, f"{name}.gelu", "activation", "gelu", (h,), g, M * f, fuse=name)
    return b.linear(f"{name}.w2", g, f, z["d"], pre + "mlp_out", sparse, name, **kw)


def routed_rows(tokens: int, moe: Any) -> int:
    """(token, expert) rows the experts compute for ``tokens`` tokens: tokens·top_k dropless;
    with a capacity factor c at most E·ceil(c·tokens·top_k/E) (balanced routing assumed: Kiln
    runs the kept rows only and never pads an expert up to its capacity)."""
    rows = tokens * moe.top_k
    if moe.capacity_factor is None:
        return rows
    return min(rows, moe.experts * math.ceil(moe.capacity_factor * rows / moe.experts))


def _moe_mlp(b: _Builder, x: Tensor) -> Tensor:
    """kiln.models.moe.MoE, for M tokens and R = routed_rows(M) rows:

    router GEMM [M, d]·[d, E] → softmax/sigmoid (fp32) → top-k (M·E compares) → dispatch
    (sort, then gather R rows of x) → grouped GEMMs of the experts over R rows (every expert's
    weights read once) → gate multiply → combine (index_add of R rows into M) [+ the shared
    MLP on all M tokens, and its add]. The router is costed as a compute-dtype linear (Kiln
    runs it in fp32: its M·d·E FLOPs are ~E/(k·f) of the experts'); the balancing losses
    (a few M·E element-wise FLOPs) are not counted."""
    from kiln.planning.moe import expert_width

    m, z, M, a = b.moe, b.z, b.M, b.a
    E, R = m.experts, routed_rows(M, m)
    logits = b.linear("moe.router", x, z["d"], E, "router_logits", False, "moe_router", False)
    scores = b.t("router_scores", M * E, 4)
    _ew(b, "moe.router.scores", "softmax", "softmax", (logits,), scores, M * E,
        fuse="moe_router")  # fmt: skip
    gates = b.t("gates", M * m.top_k, 4)
    _ew(b, "moe.topk", "elementwise", "topk", (scores,), gates, M * E, fuse="moe_router",
        saves=False)  # fmt: skip
    xd = b.t("x_routed", R * z["d"], a)
    _ew(b, "moe.dispatch", "copy", "copy", (x,), xd, 0, saves=False)
    y = _mlp(b, xd, "moe.experts", expert_width(b.shape), R, (E, m.top_k), "e_")
    yg = b.t("e_weighted", R * z["d"], a)
    _ew(b, "moe.gate", "elementwise", "mul", (y, gates), yg, R * z["d"])
    out = b.t("moe_out", M * z["d"], a)
    _ew(b, "moe.combine", "copy", "add", (yg,), out, R * z["d"], saves=False)
    if not m.shared_experts:
        return out
    shared = _mlp(b, x, "moe.shared", m.shared_experts * expert_width(b.shape), pre="s_")
    if getattr(m, "shared_gate", False):  # sigmoid(x·w) [M, 1] scales the shared output
        g = b.linear("moe.shared_gate", x, z["d"], 1, "s_gate", False, bias=False)
        gated = b.t("s_gated", M * z["d"], a)
        _ew(b, "moe.shared_gate.mul", "elementwise", "mul", (shared, g), gated, M * z["d"])
        shared = gated
    total = b.t("moe_out_total", M * z["d"], a)
    _ew(b, "moe.shared_add", "elementwise", "add", (out, shared), total, M * z["d"],
        saves=False)  # fmt: skip
    return total


def _residual(b: _Builder, name: str, x: Tensor, branch: Tensor, out: str, fuse):
    """x + branch (fp32 residual stream plus the compute-dtype branch output)."""
    y = b.t(out, b.M * b.z["d"], 4)
    _ew(b, name, "elementwise", "add", (x, branch), y, b.M * b.z["d"], fuse=fuse, saves=False)
    return y


def _block(shape: Any, step: StepShape, scope: str, count: int, mlp) -> _Builder:
    """One transformer block (pre-norm, or parallel attention + MLP) with MLP ``mlp``."""
    b = _Builder(shape, step, scope, count)
    x = b.t("x", b.M * b.z["d"], 4)
    n1 = _norm(b, "attn_norm", x, "attn_in")
    att = _attention(b, n1)
    if b.z["parallel"]:
        out = mlp(b, n1)
        mid = _residual(b, "residual_attn", x, att, "x_mid", "attn_in")
        _residual(b, "residual_mlp", mid, out, "x_out", None)
        return b
    x2 = _residual(b, "residual_attn", x, att, "x_mid", "mlp_in")
    n2 = _norm(b, "mlp_norm", x2, "mlp_in")
    _residual(b, "residual_mlp", x2, mlp(b, n2), "x_out", None)
    return b


def block_ops(shape: Any, step: StepShape) -> list[Op]:
    """The transformer blocks: dense ones (scope 'block', ``count`` = their number) and MoE
    ones (scope 'moe_block', the MLP replaced by :func:`_moe_mlp`); forwards, then backwards
    in reverse."""
    from kiln.planning.moe import n_moe_layers

    n_moe = n_moe_layers(shape)
    n_dense = dims(shape)["L"] - n_moe
    kinds = [("block", n_dense, _mlp), ("moe_block", n_moe, _moe_mlp)]
    built = [_block(shape, step, s, n, mlp).ops() for s, n, mlp in kinds if n]
    fwd = [o for ops in built for o in ops if o.phase == "fwd"]
    return fwd + [o for ops in reversed(built) for o in ops if o.phase != "fwd"]


def _weight_cast_ops(block: list[Op], step: StepShape) -> list[Op]:
    """bf16 autocast casts every fp32 weight a matmul uses once per forward."""
    if step.precision != "bf16":
        return []
    out = []
    for o in block:
        if o.kind == "matmul" and o.phase == "fwd":
            w = next(t for t in o.reads if t.kind == "weight")
            src = Tensor(w.name + "32", w.bytes * 2, "weight")
            out.append(Op(o.name + ".weight_cast", "cast", "fwd", 0.0, (src,), (w,), o.count,
                          o.scope))  # fmt: skip
    return out


def embedding_ops(shape: Any, step: StepShape) -> list[Op]:
    """Token (+ learned position) embedding lookup and add; backward scatters into the table."""
    b = _Builder(shape, step, "model", 1)
    d, V, M = b.z["d"], b.z["V"], b.M
    table = b.t("tok_emb.w", V * d, 4, "weight")
    x = b.t("x_emb", M * d, 4)
    reads = (b.t("tokens", M, 8), table)
    b.op("fwd", "embed", "embedding", M * d if b.z["learned_pos"] else 0, reads, (x,),
         params=V * d, embedding=True)  # fmt: skip
    b.bwd.append([Op("embed.bwd", "embedding", "bwd", M * d, (b.t("dx_emb", M * d, 4),),
                     (b.t("tok_emb.grad", V * d, 4, "grad"),), 1, "model")])  # fmt: skip
    if b.z["learned_pos"]:
        b.op("fwd", "pos_embed", "embedding", 0, (), (), params=b.z["S"] * d, embedding=True)
    return b.ops()


def head_ops(shape: Any, step: StepShape) -> list[Op]:
    """Final norm, then the chunked head + cross entropy of kiln.models.loss: the loss's
    forward already writes d loss / d logits (M × V in the compute dtype); backward is the
    head's two matmuls."""
    b = _Builder(shape, step, "model", 1)
    z, M, a = b.z, b.M, b.a
    d, V = z["d"], z["V"]
    n = _norm(b, "final_norm", b.t("x_final", M * d, 4), "head")
    wv = b.t("head.w", V * d, a, "weight")
    logits, glog = b.t("logits", M * V, a), b.t("dlogits", M * V, a)
    b.op("fwd", "head", "matmul", 2 * M * d * V, (n, wv), (logits,),
         params=0 if z["tied"] else V * d, tied_params=V * d if z["tied"] else 0,
         fuse="head")  # fmt: skip
    b.op("fwd", "loss", "loss", _EW["loss"] * M * V, (logits,), (glog,), fuse="head")
    b.bwd.append([
        Op("head.wgrad", "matmul", "bwd", 2 * M * d * V, (glog, n), (b.t("head.dw", V * d, a),),
           1, "model"),
        Op("head.dgrad", "matmul", "bwd", 2 * M * d * V, (glog, wv), (b.t("dfinal", M * d, a),),
           1, "model"),
    ])  # fmt: skip
    grad = b.t("head.grad", V * d, 4, "grad")
    if a != 4:
        b.bwd[-1].append(Op("head.grad_cast", "cast", "bwd", 0.0, (b.t("head.dw", V * d, a),),
                            (grad,), 1, "model"))  # fmt: skip
    if z["tied"]:  # autograd adds the head's and the embedding's gradients of the one table
        b.bwd[-1].append(Op("tied_grad_add", "elementwise", "bwd", V * d,
                            (grad, b.t("tok_emb.grad", V * d, 4, "grad")),
                            (b.t("tok_emb.grad_sum", V * d, 4, "grad"),), 1, "model"))  # fmt: skip
    return b.ops()


def optimizer_ops(n_params: int, step: StepShape) -> list[Op]:
    """Fused AdamW over every parameter: reads p, g, m, v; writes p, m, v (28 bytes each)."""
    if not step.optimizer:
        return []
    rw = lambda *names: tuple(Tensor(n, 4.0 * n_params, k) for n, k in names)  # noqa: E731
    reads = rw(("params", "weight"), ("grads", "grad"), ("exp_avg", "state"),
               ("exp_avg_sq", "state"))  # fmt: skip
    writes = rw(("params", "weight"), ("exp_avg", "state"), ("exp_avg_sq", "state"))
    return [Op("adamw", "optimizer", "opt", _EW["adamw"] * n_params, reads, writes)]


def model_ops(shape: Any, step: StepShape | None = None) -> list[Op]:
    """Forward then backward of one step: embeddings, n_layers blocks (``count``), head + loss;
    in bf16 the weight casts autocast makes once per forward come first."""
    step = step or StepShape()
    parts = [embedding_ops(shape, step), block_ops(shape, step), head_ops(shape, step)]
    casts = [c for p in parts for c in _weight_cast_ops(p, step)]
    fwd = [o for p in parts for o in p if o.phase == "fwd"]
    bwd = [o for p in reversed(parts) for o in p if o.phase == "bwd"]
    return casts + fwd + bwd


def training_ops(shape: Any, step: StepShape | None = None) -> list[Op]:
    """Every op of one training step: :func:`model_ops` plus the optimizer."""
    step = step or StepShape()
    check_step(shape, step)
    ops = model_ops(shape, step)
    return ops + optimizer_ops(param_count(shape), step)


def check_step(shape: Any, step: StepShape) -> None:
    """One-sentence ConfigErrors for a step the model cannot describe."""
    for name in ("batch", "seq_len"):
        if int(getattr(step, name)) < 1:
            raise ConfigError(f"{name} is {getattr(step, name)} but must be a positive integer.")
    if step.precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision {step.precision!r} is unknown; use bf16 or fp32.")
    if not 0 < step.density <= 1:
        raise ConfigError(f"density {step.density} must be in (0, 1] (sparsity in [0, 1)).")


# -- numbers derived from the description --------------------------------------------------
def param_count(shape: Any, include_embeddings: bool = True, active: bool = False) -> int:
    """Parameters owned by the forward ops (× count), plus the final norm; embeddings (token
    and position tables) are dropped with ``include_embeddings=False``. ``active`` counts of
    the routed experts only the top_k a token uses (total = every expert)."""
    ops = model_ops(shape, StepShape(batch=1, seq_len=1, precision="fp32"))
    return sum(
        (o.active_params if active and o.active_params is not None else o.params) * o.count
        for o in ops
        if include_embeddings or not o.embedding
    )


def matmul_params(shape: Any) -> int:
    """Weights that take part in a matmul per token: active non-embedding params (routed
    experts: top_k of them) + a tied head."""
    ops = model_ops(shape, StepShape(batch=1, seq_len=1, precision="fp32"))
    return param_count(shape, False, active=True) + sum(o.tied_params * o.count for o in ops)


def attention_flops_per_token(shape: Any, seq_len: int) -> float:
    """FLOPs of QKᵀ and attention·V, forward and backward, per token: 12·L·S·d_attn."""
    step = StepShape(batch=1, seq_len=seq_len, precision="fp32", optimizer=False)
    ops = block_ops(shape, step)
    return sum(o.flops * o.count for o in ops if o.kind == "attention") / seq_len


def model_flops_per_token(shape: Any, seq_len: int) -> float:
    """PaLM/Megatron model FLOPs: 6·N_mm + 12·L·S·d_attn (see kiln.planning.flops)."""
    return 6.0 * matmul_params(shape) + attention_flops_per_token(shape, seq_len)


def block_params(shape: Any) -> int:
    """Parameters of one transformer block: the largest kind (an MoE block with all its
    experts, when the shape has one), which is what FSDP gathers at its peak."""
    step = StepShape(batch=1, seq_len=1, precision="fp32", optimizer=False)
    ops = block_ops(shape, step)
    return max(sum(o.params for o in ops if o.scope == s) for s in {o.scope for o in ops})


def totals(ops: list[Op]) -> dict[str, float]:
    """FLOPs and kernel-by-kernel bytes of a list of ops (each × count)."""
    return {
        "flops": sum(o.flops * o.count for o in ops),
        "bytes": sum(o.bytes * o.count for o in ops),
    }


__all__ = ["KINDS", "PHASES", "Op", "StepShape", "Tensor", "attention_flops_per_token",
           "block_ops", "block_params", "check_step", "dims", "embedding_ops", "head_ops",
           "matmul_params", "model_flops_per_token", "model_ops", "optimizer_ops",
           "param_count", "routed_rows", "totals", "training_ops"]  # fmt: skip
