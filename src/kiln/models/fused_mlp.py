"""A dense GELU MLP whose ``[tokens x d_ffn]`` intermediate is never written at full size.

``y = W2 gelu(W1 x + b1) + b2`` runs over token tiles of ``tile`` rows: per tile GEMM -> GELU
-> GEMM into two tile-sized buffers (``h``, ``g``) that stay in cache and are reused by the next
tile. Nothing of the hidden layer is saved for backward: the backward recomputes each tile's
``h = W1 x + b1`` (one extra GEMM, 2·T·d·f FLOPs: 7/6 of the unfused MLP's fwd+bwd FLOPs) and
consumes it at once::

    dW2 += dy_t^T g_t      dg = dy_t W2      dh = gelu'(h_t) * dg
    dW1 += dh^T x_t        dx_t = dh W1      db1 += sum(dh),  db2 = sum(dy)

Off-chip traffic per fwd+bwd, against the unfused MLP's ~10 full-size ``T x f`` passes (h and
g written, read back, dg, dh written and read): the weights are read once per tile and the
weight gradients read-modified-written once per tile (``4 d f (3 + 2 n_tiles)`` bytes in
fp32) — a win when ``T x f`` is large against ``d x f x n_tiles``, i.e. for big tiles; the
tile must still fit in cache. Whether it pays on a machine is measured, never assumed:
:func:`choose_fused_mlp` times both on the real shape (``train.fused_mlp: auto``).

:class:`FusedGeluMLP` swaps in for a :class:`~kiln.models.gpt.GeluMLP` from outside
(:func:`fuse_gelu_mlps`), holding the same ``w1`` / ``w2`` Linear children, so parameter names,
optimizer state and checkpoints are unchanged.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.gpt import GeluMLP

log = logging.getLogger(__name__)

__all__ = [
    "FusedGeluMLP",
    "TiledGeluMLPFn",
    "apply_fused_mlp",
    "choose_fused_mlp",
    "fuse_gelu_mlps",
    "tiled_mlp",
]

_gelu_out = torch.ops.aten.gelu.out
_gelu_bwd_out = torch.ops.aten.gelu_backward.grad_input


def _fc1(xt, w1, b1, out):
    """h = x W1^T + b1 into ``out`` (no allocation)."""
    if b1 is None:
        return torch.mm(xt, w1.t(), out=out)
    return torch.addmm(b1, xt, w1.t(), out=out)


class TiledGeluMLPFn(torch.autograd.Function):
    """Token-tiled ``W2 gelu(W1 x + b1) + b2`` with a recomputing backward (see module doc)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str, tile: int):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        T, f = x2.shape[0], w1.shape[0]
        y = x2.new_empty(T, w2.shape[0])
        h, g = x2.new_empty(min(tile, T), f), x2.new_empty(min(tile, T), f)
        for s in range(0, T, tile):
            n = min(tile, T - s)
            ht, gt = _fc1(x2[s : s + n], w1, b1, h[:n]), g[:n]
            _gelu_out(ht, approximate=approximate, out=gt)
            if b2 is None:
                torch.mm(gt, w2.t(), out=y[s : s + n])
            else:
                torch.addmm(b2, gt, w2.t(), out=y[s : s + n])
        ctx.save_for_backward(x2, w1, b1, w2)
        ctx.approximate, ctx.tile, ctx.has_b2 = approximate, tile, b2 is not None
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, w1, b1, w2 = ctx.saved_tensors
        dy = grad.reshape(-1, w2.shape[0]).contiguous()
        T, f, tile = x2.shape[0], w1.shape[0], ctx.tile
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dx = torch.empty_like(x2) if need_x else None
        dw1, dw2 = torch.zeros_like(w1), torch.zeros_like(w2)
        db1 = x2.new_zeros(f) if b1 is not None else None
        h, g, dg = (x2.new_empty(min(tile, T), f) for _ in range(3))
        for s in range(0, T, tile):
            n = min(tile, T - s)
            xt, dyt = x2[s : s + n], dy[s : s + n]
            ht, gt, dgt = _fc1(xt, w1, b1, h[:n]), g[:n], dg[:n]
            _gelu_out(ht, approximate=ctx.approximate, out=gt)
            dw2.addmm_(dyt.t(), gt)
            torch.mm(dyt, w2, out=dgt)
            dh = _gelu_bwd_out(dgt, ht, approximate=ctx.approximate, grad_input=gt)  # g is spent
            dw1.addmm_(dh.t(), xt)
            if db1 is not None:
                db1 += dh.sum(0)
            if dx is not None:
                torch.mm(dh, w1, out=dx[s : s + n])
        db2 = dy.sum(0) if ctx.has_b2 and need_b2 else None
        return (
            None if dx is None else dx.view(grad.shape[:-1] + (x2.shape[1],)),
            dw1 if need_w1 else None,
            db1 if need_b1 else None,
            dw2 if need_w2 else None,
            db2,
            None,
            None,
        )


def tiled_mlp(x, w1, b1, w2, b2, approximate: str = "none", tile: int = 256):
    """Functional form of :class:`TiledGeluMLPFn` (computes in ``x``'s dtype)."""
    return TiledGeluMLPFn.apply(x, w1, b1, w2, b2, approximate, tile)


class FusedGeluMLP(nn.Module):
    """A GeluMLP's forward through :func:`tiled_mlp`, sharing the GeluMLP's ``w1`` / ``w2``.

    Under autocast (bf16 runs) the tiled path does not apply (it computes in x's dtype, as
    written for fp32 CPU runs); it falls back to the unfused forward there.
    """

    def __init__(self, mlp: GeluMLP, tile: int) -> None:
        super().__init__()
        self.w1, self.w2, self.approximate, self.tile = mlp.w1, mlp.w2, mlp.approximate, tile

    def init_weights(self, init_std: float, out_std: float) -> None:
        GeluMLP.init_weights(self, init_std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return self.w2(F.gelu(self.w1(x), approximate=self.approximate))
        w1, w2 = self.w1, self.w2
        return tiled_mlp(x, w1.weight, w1.bias, w2.weight, w2.bias, self.approximate, self.tile)


def fuse_gelu_mlps(model: nn.Module, tile: int) -> list[str]:
    """Swap every dense GeluMLP in ``model`` for a FusedGeluMLP (same Parameters); returns the
    swapped module paths."""
    swapped = []
    for path, module in list(model.named_modules()):
        if type(module) is not GeluMLP:
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, FusedGeluMLP(module, tile))
        swapped.append(path)
    return swapped


def _fwd_bwd_seconds(fn, x, params, reps: int) -> float:
    """Fastest of ``reps`` fwd+bwd runs after one warm-up (load only adds time)."""
    best = float("inf")
    for i in range(reps + 1):
        start = time.perf_counter()
        y = fn(x)
        torch.autograd.grad(y, (x, *params), torch.ones_like(y))
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def choose_fused_mlp(
    d_model: int,
    d_ffn: int,
    tokens: int,
    approximate: str = "none",
    dtype: torch.dtype = torch.float32,
    tiles: tuple[int, ...] = (128, 256, 512),
    reps: int = 3,
) -> tuple[int | None, dict[str, float]]:
    """(tile to use, or None for the unfused MLP; fwd+bwd seconds per candidate).

    Times the unfused MLP and the tiled one at each tile size on this shape, fastest of
    ``reps``; a tile wins only when strictly faster than unfused.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=gen, dtype=dtype).requires_grad_()
    w1 = (torch.randn(d_ffn, d_model, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    w2 = (torch.randn(d_model, d_ffn, generator=gen, dtype=dtype) * 0.02).requires_grad_()
    b1 = torch.zeros(d_ffn, dtype=dtype, requires_grad=True)
    b2 = torch.zeros(d_model, dtype=dtype, requires_grad=True)
    params = (w1, b1, w2, b2)
    times = {
        "unfused": _fwd_bwd_seconds(
            lambda t: F.linear(F.gelu(F.linear(t, w1, b1), approximate=approximate), w2, b2),
            x,
            params,
            reps,
        )
    }
    for tile in tiles:
        if tile >= tokens and tile != tiles[0]:
            continue
        fn = lambda t, tile=tile: tiled_mlp(t, w1, b1, w2, b2, approximate, tile)  # noqa: E731
        times[f"tile{tile}"] = _fwd_bwd_seconds(fn, x, params, reps)
    best = min(times, key=times.get)
    log.info("fused MLP choice: %s", _ranked(times))
    return (None if best == "unfused" else int(best[4:])), times


def _ranked(times: dict[str, float]) -> str:
    """``"unfused 31.0 ms < tile512 40.2 ms < ..."`` (fastest first)."""
    return " < ".join(f"{k} {times[k] * 1e3:.1f} ms" for k in sorted(times, key=times.get))


def _auto_tile(d: int, f: int, tokens: int, approximate: str) -> tuple[int | None, str]:
    """(tile or None for unfused, why): an earlier process's measurement on this machine for
    this shape, else measured now and remembered ($KILN_CACHE/hardware.json), so a resumed run
    computes its MLPs as the run it continues did (the paths round differently)."""
    from kiln.planning.cpu_calibration import recall_choice, remember_choice

    shape = (d, f, tokens, approximate)
    entry = recall_choice("fused-mlp", shape)
    if entry is not None and "tile" in entry:
        return entry["tile"], f"as measured earlier on this machine: {entry.get('why')}"
    tile, times = choose_fused_mlp(d, f, tokens, approximate)
    why = _ranked(times)
    remember_choice("fused-mlp", shape, {"tile": tile, "why": why})
    return tile, why


def apply_fused_mlp(model: nn.Module, mode: str, tokens: int, precision: str) -> str:
    """Apply ``train.fused_mlp`` (``off`` / ``auto`` / ``on``) to ``model``; returns what was done.

    ``auto`` times the unfused and tiled MLP on the model's first dense GeluMLP shape with
    ``tokens`` tokens (one micro-batch) and swaps only when a tile measured faster. The tiled
    kernel computes in the input's dtype, so in a bf16 (autocast) run it does not apply.
    """
    mlps = [m for m in model.modules() if type(m) is GeluMLP]
    if mode == "off" or not mlps:
        return "fused MLP: off" if mode == "off" else "fused MLP: no dense GELU MLP in this model"
    if precision != "fp32":
        return f"fused MLP: not used ({precision} run; the tiled kernel is written for fp32)"
    tile, why = 256, "train.fused_mlp is 'on'"
    if mode == "auto":
        first = mlps[0]
        d, f = first.w1.in_features, first.w1.out_features
        tile, why = _auto_tile(d, f, tokens, first.approximate)
        if tile is None:
            return f"fused MLP: unfused is faster here ({why})"
    paths = fuse_gelu_mlps(model, tile)
    return f"fused MLP: {len(paths)} MLPs token-tiled, tile {tile} ({why})"
