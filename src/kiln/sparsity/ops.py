"""Kiln's block-sparse kernels as ``torch.library`` custom ops (namespace ``kiln``).

Registered ops, each with a fake (meta) kernel and, for the forward ones, an autograd formula::

    kiln::block_sparse_linear(x[T, in], weight[out, in], bias?, kept, block_size, nnzb, backend)
        -> (y[T, out] in x.dtype, saved)       # saved: packed W^T blocks (cpp/amx), else empty
    kiln::block_sparse_linear_backward(dy, x, weight, saved, kept, block_size, needs..., backend)
        -> (dx, dw, db fp32)                   # empty where not needed
    kiln::block_sparse_mlp(x, w1, b1?, kept1, bs1, nnzb1, w2, b2?, kept2, bs2, nnzb2, backend)
        -> (y, gelu'(h), g as token pairs, W1^T packed, W2^T packed)      # C++ only
    kiln::block_sparse_mlp_backward(...) -> (dx, dw1, dw2, db1, db2)      # C++ only

Why ops and not ``autograd.Function`` + ``torch.compiler.disable``: Dynamo traces a custom op as
one opaque node whose output shapes come from the fake kernel, so ``torch.compile(fullgraph=
True)`` compiles a sparse model as one graph and Inductor fuses the norms, residuals and casts
around the kernels; the C++ kernels still see real, contiguous, live tensors (allocations
happen inside the op), which the earlier graph break was there to guarantee.

Ops take only tensors and scalars, so the layout travels as its ``kept`` block map (bool
``[out / b, in / b]``) plus ``block_size`` and ``nnzb`` (the kept count, which the fake kernel
needs for the packed-weight shapes); the real kernels rebuild a :class:`BlockLayout` from a
small cache keyed by the map's bytes. The caller casts ``x`` to the dtype ``F.linear`` would
compute in (autocast), so the ops themselves never look at autocast state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.sparsity.kernels import (
    BlockLayout,
    _cpp_backward,
    _cpp_forward,
    _torch_backward,
    _torch_forward,
    amx_extension,
    cpp_extension,
)

__all__ = ["layout_of"]

_BF16, _F32 = torch.bfloat16, torch.float32
_CPP = ("cpp", "amx")  # the C++ backends: AVX512-BF16, AMX tiles
_LAYOUTS: dict[tuple, BlockLayout] = {}


def layout_of(kept: Tensor, block_size: int) -> BlockLayout:
    """The BlockLayout of a kept-block map (cached by the map's bytes; maps are tiny)."""
    kept = kept.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(kept.shape), block_size, kept.numpy().tobytes())
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        rows, cols = kept.shape
        _LAYOUTS[key] = BlockLayout(rows * block_size, cols * block_size, block_size, kept)
    return _LAYOUTS[key]


def _ext(backend: str = "cpp"):
    """The C++ kernels of ``backend``: 'amx' (tile build) or 'cpp' (AVX512-BF16)."""
    ext = amx_extension() if backend == "amx" else cpp_extension()
    if ext is None:
        raise RuntimeError(f"kiln block-sparse {backend} kernels are unavailable on this machine")
    return ext


def _empty_like_none(t: Tensor | None, ref: Tensor) -> Tensor:
    """Ops cannot return None: an empty tensor stands for a gradient nobody asked for."""
    return ref.new_empty(0) if t is None else t


# ------------------------------------------------------------------------------ linear


@torch.library.custom_op("kiln::block_sparse_linear", mutates_args=())
def block_sparse_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    kept: Tensor,
    block_size: int,
    nnzb: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    lay = layout_of(kept, block_size)
    if backend in _CPP:
        x2 = x.to(_BF16).contiguous()
        y, wt = _cpp_forward(_ext(backend), x2, weight, bias, lay)
        return y.to(x.dtype), wt
    return _torch_forward(x.contiguous(), weight, bias, lay).to(x.dtype), weight.new_empty(0)


@block_sparse_linear_op.register_fake
def _(x, weight, bias, kept, block_size, nnzb, backend):
    y = x.new_empty(x.shape[0], kept.shape[0] * block_size)
    if backend in _CPP:
        return y, x.new_empty(nnzb, block_size * block_size, dtype=_BF16)
    return y, weight.new_empty(0)


@torch.library.custom_op("kiln::block_sparse_linear_backward", mutates_args=())
def block_sparse_linear_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    kept: Tensor,
    block_size: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    lay = layout_of(kept, block_size)
    if backend in _CPP:
        dy2, x2 = dy.to(_BF16).contiguous(), x.to(_BF16).contiguous()
        needs = (need_x, need_w, need_b)
        dx, dw, db = _cpp_backward(_ext(backend), dy2, x2, saved, weight.dtype, lay, *needs)
    else:
        dy2 = dy.to(x.dtype).contiguous()
        dx, dw = _torch_backward(dy2, x.contiguous(), weight, lay, need_x, need_w)
        db = dy2.sum(0, dtype=_F32) if need_b else None
    dx = None if dx is None else dx.to(x.dtype)
    return _empty_like_none(dx, x), _empty_like_none(dw, weight), _empty_like_none(db, dy.float())


@block_sparse_linear_backward_op.register_fake
def _(dy, x, weight, saved, kept, block_size, need_x, need_w, need_b, backend):
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    db = dy.new_empty(dy.shape[1], dtype=_F32) if need_b else dy.new_empty(0, dtype=_F32)
    return dx, dw, db


def _linear_setup(ctx, inputs, output):
    x, weight, bias, kept, block_size, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1], kept)
    ctx.block_size, ctx.backend = block_size, backend
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved-W^T output
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad, _grad_saved):
    if grad is None:  # y unused: no gradient flows
        return (None,) * 7
    x, weight, saved, kept = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = block_sparse_linear_backward_op(
        grad, x, weight, saved, kept, ctx.block_size, need_x, need_w, need_b, ctx.backend
    )
    return (
        dx if need_x else None,
        dw if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None,
        None,
        None,
        None,
    )


block_sparse_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------- fused MLP (C++)


@torch.library.custom_op("kiln::block_sparse_mlp", mutates_args=())
def block_sparse_mlp_op(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    kept1: Tensor,
    bs1: int,
    nnzb1: int,
    w2: Tensor,
    b2: Tensor | None,
    kept2: Tensor,
    bs2: int,
    nnzb2: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lay1, lay2 = layout_of(kept1, bs1), layout_of(kept2, bs2)
    c1, c2 = (None if c is None else c.float().contiguous() for c in (b1, b2))
    x2 = x.to(_BF16).contiguous()
    y, dgelu, gp, w1t, w2t = _ext(backend).mlp_forward(x2, w1, lay1, c1, w2, lay2, c2)
    return y.to(x.dtype), dgelu, gp, w1t, w2t


@block_sparse_mlp_op.register_fake
def _(x, w1, b1, kept1, bs1, nnzb1, w2, b2, kept2, bs2, nnzb2, backend):
    t, f = x.shape[0], kept1.shape[0] * bs1
    bf = {"dtype": _BF16}
    return (
        x.new_empty(t, kept2.shape[0] * bs2),
        x.new_empty(t, f, **bf),
        x.new_empty(f // bs2, (t + 1) // 2, bs2, 2, **bf),
        x.new_empty(nnzb1, bs1 * bs1, **bf),
        x.new_empty(nnzb2, bs2 * bs2, **bf),
    )


@torch.library.custom_op("kiln::block_sparse_mlp_backward", mutates_args=())
def block_sparse_mlp_backward_op(
    dy: Tensor,
    x: Tensor,
    dgelu: Tensor,
    gp: Tensor,
    w1t: Tensor,
    w2t: Tensor,
    kept1: Tensor,
    bs1: int,
    kept2: Tensor,
    bs2: int,
    need_w: bool,
    f32_1: bool,
    f32_2: bool,
    need_b1: bool,
    need_b2: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    lay1, lay2 = layout_of(kept1, bs1), layout_of(kept2, bs2)
    dy2, x2 = dy.to(_BF16).contiguous(), x.to(_BF16).contiguous()
    dx, dw1, dw2, db1, db2 = _ext(backend).mlp_backward(
        dy2, x2, dgelu, gp, w1t, lay1, w2t, lay2, need_w, (f32_1, f32_2), (need_b1, need_b2)
    )
    f32 = dy.new_empty(0, dtype=_F32)
    dw1, dw2 = (_empty_like_none(w, f32) for w in (dw1, dw2))
    return dx.to(x.dtype), dw1, dw2, _empty_like_none(db1, f32), _empty_like_none(db2, f32)


@block_sparse_mlp_backward_op.register_fake
def _(dy, x, dgelu, gp, w1t, w2t, kept1, bs1, kept2, bs2, need_w, f32_1, f32_2, nb1, nb2, backend):
    d, f = kept1.shape[1] * bs1, kept1.shape[0] * bs1

    def new(shape, fp32: bool, needed: bool) -> Tensor:
        return dy.new_empty(shape if needed else (0,), dtype=_F32 if fp32 else _BF16)

    return (
        x.new_empty(x.shape),
        new((f, d), f32_1, need_w),
        new((d, f), f32_2, need_w),
        new((f,), True, nb1),
        new((d,), True, nb2),
    )


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, kept1, bs1, _, w2, b2, kept2, bs2, _, backend = inputs
    _, dgelu, gp, w1t, w2t = output
    ctx.save_for_backward(x, dgelu, gp, w1t, w2t, kept1, kept2)
    # Autograd would otherwise fill a zero gradient for each of the four saved outputs nobody
    # differentiates (gelu'(h) and g are [tokens, d_ffn]): ~8 ms per 111M MLP step measured.
    ctx.set_materialize_grads(False)
    ctx.sizes, ctx.w_dtypes, ctx.backend = (bs1, bs2), (w1.dtype, w2.dtype), backend
    ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)


def _mlp_backward(ctx, grad, *_unused):
    if grad is None:  # y unused (only the saved outputs were): no gradient flows
        return (None,) * 12
    x, dgelu, gp, w1t, w2t, kept1, kept2 = ctx.saved_tensors
    (bs1, bs2), (dt1, dt2) = ctx.sizes, ctx.w_dtypes
    nx, nw1, nb1, _, _, _, nw2, nb2 = ctx.needs_input_grad[:8]
    f32s = (dt1 == _F32, dt2 == _F32)
    dx, dw1, dw2, db1, db2 = block_sparse_mlp_backward_op(
        grad,
        x,
        dgelu,
        gp,
        w1t,
        w2t,
        kept1,
        bs1,
        kept2,
        bs2,
        nw1 or nw2,
        *f32s,
        nb1,
        nb2,
        ctx.backend,
    )
    return (
        dx if nx else None,
        dw1.to(dt1) if nw1 else None,
        db1.to(ctx.bias_dtypes[0]) if nb1 else None,
        None,
        None,
        None,
        dw2.to(dt2) if nw2 else None,
        db2.to(ctx.bias_dtypes[1]) if nb2 else None,
        None,
        None,
        None,
        None,
    )


block_sparse_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)
