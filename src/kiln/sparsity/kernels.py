"""Sparse linear kernels whose cost scales with the kept weights (bf16 compute on CPU).

Design for integration: the model keeps an ordinary dense ``nn.Linear`` weight ``[out, in]``
(masked: zeros exactly zero), so checkpoints, export and optimizers see nothing special. Only
the forward is swapped::

    layout = BlockLayout.from_mask(mask, block_size=64)
    y = block_sparse_linear(x, linear.weight, linear.bias, layout)   # x: [..., in]

:func:`block_sparse_linear` (op ``kiln::block_sparse_linear``, see :mod:`kiln.sparsity.ops`)
reads only the kept ``b x b`` blocks of the dense weight (packing
them to bf16 per call costs ``density * out * in`` reads, ~0.1-0.3 ms here) and returns a
dense-shaped weight gradient that is zero outside kept blocks; only kept blocks are computed and
the zeros are written in the same pass (so an optimizer step keeps the zeros exactly zero, and
weight decay on zeros is a no-op). FLOPs: forward ``2 T out in d``, backward twice that.

Backends (same layout, same numbers up to bf16 rounding):

* ``cpp``: ``csrc/block_sparse.cpp`` (plain C ABI, see :mod:`kiln.sparsity.cpp_kernels`)
  compiled by ``make``'s install step (:func:`prebuild`), or else at first use, with
  ``g++ -O3 -fopenmp -mavx512bf16`` in a few seconds into
  ``$KILN_EXTENSIONS_DIR`` (default ``~/.cache/kiln/torch_extensions``). One AVX512-BF16
  micro-kernel computes forward, grad-input and grad-weight output-stationary from block CSR /
  CSC lists: no gathers, no scatter-adds, any block placement. A linear is 2 parallel regions
  (pack W and W^T, then forward; token-tiled backward, then dW). Used when the CPU has avx512_bf16
  and compilation succeeds; otherwise (or with ``KILN_SPARSE_CPP=0``) ``torch``.
* ``amx``: the same source compiled a second time with ``-DKILN_AMX -mamx-tile -mamx-bf16``
  (:func:`amx_extension`): every product's full 16-row slices run on AMX tiles (2 x 2 tiles of
  16 x 16 fp32 accumulators, K in steps of 32 bf16; B tiles read the same VNNI-pair panels with a
  row stride, the weight gradient's A side is packed transposed so tokens are contiguous), the
  leftover rows (tokens % 16, token pairs % 16) on the AVX512-BF16 micro-kernel. Loaded only
  where ``/proc/cpuinfo`` lists amx_tile and amx_bf16, cpuid agrees, and Linux grants the tile
  data (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, asked once before the first tile
  instruction); a refusal, a compiler without the AMX flags, or ``KILN_SPARSE_AMX=0`` leaves
  ``cpp`` (logged once). ``auto`` prefers ``amx``, then ``cpp``, then ``torch``; the chooser times
  ``blockN-amx`` and ``blockN-cpp`` as separate candidates. On the 111M MLP fwd+bwd it is
  3-5x faster than ``cpp`` (1-thread CPU time, BENCHMARKS.md). The pure-torch gather + ``bmm``
  design (``torch``, whose bmm oneDNN runs on AMX too) was measured against it there and lost.
* ``torch``: pure torch, in the dtype ``F.linear`` would compute in (bf16 under autocast,
  fp32 in an fp32 run — the only block kernel for CPUs without bf16 matmul hardware, whose
  bf16 matmuls are an order of magnitude slower than fp32). The layout is padded to the same
  number of blocks per block-row (``rows``) or per block-column (``cols``, via ``W^T``),
  whichever pads less; forward / grad-weight are one ``bmm`` over gathered activation blocks,
  grad-input a ``bmm`` followed by ``index_add_``.

:func:`block_sparse_mlp` (``W2 gelu(W1 x + b1) + b2``, both weights block-sparse) fuses the
exact GELU into the C++ kernels' epilogues and runs fc1 -> fc2 per token tile with the hidden
activations in L2: 2 parallel regions per fwd+bwd (op ``kiln::block_sparse_mlp``). Hidden units
whose fc2 column keeps no block never reach the output and get exactly zero gradients: their
fc1 products, GELU, packing, dX contributions and dW1 blocks are skipped (zeros written).

Also here: :func:`masked_linear` (dense times mask, the always-valid fallback),
:func:`dense_linear` (plain ``F.linear`` on the zero-filled weight, the gradient masked by the
caller) and 2:4 semi-structured on CUDA (guarded). :func:`~kiln.sparsity.choose.choose_kernel`
(kiln.sparsity.choose) times every candidate — dense ones included — once per
shape/pattern/density/dtype/device, keeps the fastest and says what each took.
"""

from __future__ import annotations

import logging
import os
import subprocess
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError
from kiln.models.loss import compute_dtype
from kiln.sparsity.cpp_kernels import CppKernels, build_library

log = logging.getLogger(__name__)

__all__ = [
    "BlockLayout",
    "BlockSparseLinear",
    "block_sparse_linear",
    "amx_extension",
    "block_sparse_mlp",
    "cpp_extension",
    "dense_linear",
    "masked_linear",
    "semi_structured_available",
]


class BlockLayout:
    """Kept ``b x b`` blocks of an ``[out, in]`` weight as block CSR (and CSC for grad-input)."""

    def __init__(self, out_features: int, in_features: int, block_size: int, kept: torch.Tensor):
        """kept: bool ``[out / b, in / b]``, True where the block is kept."""
        self.out_features, self.in_features, self.block_size = out_features, in_features, block_size
        self.kept = kept.detach().to("cpu", torch.bool).contiguous()
        rows, cols = self.kept.nonzero(as_tuple=True)  # row-major order = CSR order
        self.rows, self.cols = rows.contiguous(), cols.contiguous()
        counts = self.kept.sum(1)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        cols_t, rows_t = self.kept.t().nonzero(as_tuple=True)  # CSC order
        self.csc_rows, self.csc_cols = rows_t.contiguous(), cols_t.contiguous()
        ccounts = self.kept.sum(0)
        self.ccol = torch.cat([ccounts.new_zeros(1), ccounts.cumsum(0)])

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int) -> BlockLayout:
        """Build from a bool ``[out, in]`` mask made of whole blocks (e.g. from block_mask)."""
        out_f, in_f = mask.shape
        b = block_size
        if b % 32 or out_f % b or in_f % b:
            raise ConfigError(
                f"block size {b} must be a multiple of 32 dividing the weight shape "
                f"[{out_f}, {in_f}]."
            )
        blocks = mask.detach().to("cpu", torch.bool).reshape(out_f // b, b, in_f // b, b)
        kept = blocks.any(dim=(1, 3))
        if not torch.equal(blocks.all(dim=(1, 3)), kept):
            raise ConfigError(
                f"mask is not made of whole {b}x{b} blocks; build it with block_mask(..., "
                f"block_size={b}) or use masked_linear."
            )
        return cls(out_f, in_f, b, kept)

    @property
    def nnzb(self) -> int:
        """Number of kept blocks."""
        return int(self.rows.numel())

    @property
    def density(self) -> float:
        """Kept fraction of the weight."""
        return float(self.kept.float().mean())

    def to_mask(self) -> torch.Tensor:
        """The bool ``[out, in]`` mask."""
        b = self.block_size
        nbr, nbc = self.kept.shape
        return (
            self.kept.view(nbr, 1, nbc, 1)
            .expand(nbr, b, nbc, b)
            .reshape(self.out_features, self.in_features)
        )

    @cached_property
    def padded(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(axis, idx [lines, k], valid [lines, k]) for the torch backend, the less padded axis."""
        options = []
        for axis, kept in (("rows", self.kept), ("cols", self.kept.t())):
            k = max(int(kept.sum(1).max()), 1)
            options.append((kept.shape[0] * k, axis, kept, k))
        _, axis, kept, k = min(options, key=lambda o: o[0])
        # Sort kept blocks first in each line; padding slots point at block 0 and are masked out.
        order = torch.sort(kept.to(torch.int8), dim=1, descending=True, stable=True).indices
        idx = order[:, :k].contiguous()
        valid = torch.gather(kept, 1, idx)
        return axis, idx, valid


# ----------------------------------------------------------------------------- C++ backend


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_tile" in flags and "amx_bf16" in flags


_EXT: CppKernels | None = None
_EXT_TRIED = False
_AMX: CppKernels | None = None
_AMX_TRIED = False


def cpp_extension() -> CppKernels | None:
    """The compiled block-sparse kernels, or None (no avx512_bf16, disabled, or build failed)."""
    global _EXT, _EXT_TRIED
    if _EXT_TRIED:
        return _EXT
    _EXT_TRIED = True
    if os.environ.get("KILN_SPARSE_CPP", "1") == "0" or not _cpu_has_avx512_bf16():
        return None
    try:
        _EXT = CppKernels(build_library())
    except (OSError, subprocess.CalledProcessError) as err:  # no compiler / build failed
        detail = getattr(err, "stderr", b"") or b""
        log.warning(
            "kiln block-sparse C++ kernel unavailable, using pure torch: %s %s",
            err,
            detail.decode(errors="replace")[-500:],
        )
        _EXT = None
    return _EXT


def amx_extension() -> CppKernels | None:
    """The AMX tile build of the kernels, or None: the CPU has no AMX (or no avx512_bf16, which
    its leftover rows use), ``KILN_SPARSE_AMX=0``, the build failed (a compiler without
    ``-mamx-tile``), or Linux refused the tile data permission. Each failure is logged once;
    the AVX512-BF16 kernels (:func:`cpp_extension`) and the torch ones stay available."""
    global _AMX, _AMX_TRIED
    if _AMX_TRIED:
        return _AMX
    _AMX_TRIED = True
    if os.environ.get("KILN_SPARSE_AMX", "1") == "0" or os.environ.get("KILN_SPARSE_CPP") == "0":
        return None
    if not (_cpu_has_amx() and _cpu_has_avx512_bf16()):
        return None
    try:
        ext = CppKernels(build_library(amx=True), amx=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        log.warning(
            "kiln AMX block-sparse kernels unavailable (build failed), using AVX512-BF16: %s %s",
            err,
            detail.decode(errors="replace")[-500:],
        )
        return None
    refused = ext.amx_init()
    if refused is not None:
        log.warning("kiln AMX block-sparse kernels unavailable (%s), using AVX512-BF16", refused)
        return None
    _AMX = ext
    return _AMX


def _cpp_forward(ext: CppKernels, x2, weight, bias, lay: BlockLayout):
    """(y, W packed for grad-input): one region packs W both ways, then computes y."""
    b32 = bias.float().contiguous() if bias is not None else None
    return ext.linear_forward(x2, weight, lay, b32)


def _cpp_backward(ext: CppKernels, dy2, x2, wt, w_dtype, lay: BlockLayout, *needs: bool):
    """(dx, dw, db fp32) in one region: token tiles (dx, pair packing, db), then dW."""
    need_x, need_w, need_b = needs
    f32 = w_dtype == torch.float32
    dx, dw, db = ext.linear_backward(dy2, x2, wt, lay, need_x, need_w, need_b, f32)
    if need_w:
        dw = dw.to(w_dtype)
    elif need_b:
        db = dy2.sum(0, dtype=torch.float32)
    return dx, dw, db


# --------------------------------------------------------------------------- torch backend


def _weight_blocks(weight: torch.Tensor, lay: BlockLayout, dtype: torch.dtype) -> torch.Tensor:
    """Kept blocks of A (W for axis rows, W^T for cols) as ``dtype`` ``[lines, k, b, b]``."""
    axis, idx, valid = lay.padded
    b = lay.block_size
    w = weight.to(dtype)
    if axis == "cols":
        w = w.t()
    lines = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    blocks = w.reshape(w.shape[0] // b, b, w.shape[1] // b, b)[lines, :, idx, :]
    return blocks * valid[..., None, None].to(blocks.dtype)


def _gather_mm(z: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """z [T, C] @ A^T -> [T, R] where A's kept blocks are ``blocks`` [R, k, b, b]."""
    R, k, b, _ = blocks.shape
    T = z.shape[0]
    zg = z.view(T, -1, b).index_select(1, idx.reshape(-1)).view(T, R, k * b).transpose(0, 1)
    wt = blocks.permute(0, 1, 3, 2).reshape(R, k * b, b)
    return torch.bmm(zg, wt).transpose(0, 1).reshape(T, R * b)


def _scatter_mm(u: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor, cols: int):
    """u [T, R] @ A -> [T, C]: per-line products scatter-added into their block columns."""
    R, k, b, _ = blocks.shape
    T = u.shape[0]
    parts = torch.bmm(u.view(T, R, b).transpose(0, 1), blocks.permute(0, 2, 1, 3).reshape(R, b, -1))
    out = u.new_zeros(T, cols // b, b, dtype=torch.float32)
    out.index_add_(1, idx.reshape(-1), parts.transpose(0, 1).reshape(T, R * k, b).float())
    return out.view(T, cols).to(u.dtype)


def _grad_blocks(u: torch.Tensor, z: torch.Tensor, idx: torch.Tensor, b: int) -> torch.Tensor:
    """dA[r, j] = u[:, r-block]^T @ z[:, idx[r, j]-block] -> [R, k, b, b] (fp32)."""
    R, k = idx.shape
    T = z.shape[0]
    zg = z.view(T, -1, b).index_select(1, idx.reshape(-1)).view(T, R, k * b).transpose(0, 1)
    g = torch.bmm(u.view(T, R, b).permute(1, 2, 0), zg)  # [R, b, k*b]
    return g.view(R, b, k, b).transpose(1, 2).float()


def _torch_forward(x2, weight, bias, lay: BlockLayout):
    axis, idx, _ = lay.padded
    blocks = _weight_blocks(weight, lay, x2.dtype)
    y = (
        _gather_mm(x2, blocks, idx)
        if axis == "rows"
        else _scatter_mm(x2, blocks, idx, lay.out_features)
    )
    return y if bias is None else y + bias.to(y.dtype)


def _torch_backward(dy2, x2, weight, lay: BlockLayout, need_x: bool, need_w: bool):
    axis, idx, valid = lay.padded
    b = lay.block_size
    dx = dw = None
    if need_x:
        blocks = _weight_blocks(weight, lay, dy2.dtype)
        if axis == "rows":
            dx = _scatter_mm(dy2, blocks, idx, lay.in_features)
        else:
            dx = _gather_mm(dy2, blocks, idx)
    if need_w:
        u, z = (dy2, x2) if axis == "rows" else (x2, dy2)
        g = _grad_blocks(u, z, idx, b)
        if axis == "cols":
            g = g.transpose(2, 3)
        lines = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
        r, c = (lines[valid], idx[valid]) if axis == "rows" else (idx[valid], lines[valid])
        dw = weight.new_zeros(lay.out_features // b, b, lay.in_features // b, b)
        dw[r, :, c, :] = g[valid].to(weight.dtype)
        dw = dw.view(lay.out_features, lay.in_features)
    return dx, dw


# ------------------------------------------------------------------------------- API
# The kernels run as torch.library custom ops (kiln.sparsity.ops, registered at the end of this
# module): one opaque node each under torch.compile, with fake kernels and autograd formulas.


@torch.compiler.assume_constant_result
def _cpp_available() -> bool:
    """Whether the C++ kernels run here (a constant for torch.compile: it never changes)."""
    return cpp_extension() is not None


@torch.compiler.assume_constant_result
def _amx_available() -> bool:
    """Whether the AMX tile kernels run here (a constant for torch.compile)."""
    return amx_extension() is not None


def _resolve_backend(backend: str) -> str:
    """'auto' -> 'amx' (AMX tiles) where they run, else 'cpp' (AVX512-BF16) where that runs,
    else 'torch'; an explicitly named 'amx' or 'cpp' must be available."""
    if backend == "auto":
        return "amx" if _amx_available() else "cpp" if _cpp_available() else "torch"
    if backend == "torch":
        return "torch"
    if backend not in ("cpp", "amx"):
        raise ConfigError(f"unknown block-sparse backend {backend!r} (auto, amx, cpp or torch).")
    if not (_amx_available() if backend == "amx" else _cpp_available()):
        raise ConfigError(f"block-sparse backend {backend!r} is unavailable on this machine.")
    return backend


def _check_shapes(x, weight, layout: BlockLayout) -> None:
    """The C++ kernels index raw memory: refuse shapes that disagree with the layout."""
    want = (layout.out_features, layout.in_features)
    if tuple(weight.shape) != want or x.shape[-1] != layout.in_features:
        raise ConfigError(
            f"block-sparse layout is for a weight {list(want)} and inputs [..., {want[1]}], "
            f"got weight {list(weight.shape)} and input {list(x.shape)}."
        )


def block_sparse_mlp(x, w1, b1, w2, b2, layout1, layout2, backend: str = "auto"):
    """``W2 gelu(W1 x + b1) + b2`` (exact erf GELU) with both weights block-sparse.

    With the C++ kernels the GELU is fused (op ``kiln::block_sparse_mlp``: two parallel
    regions per fwd+bwd instead of ~14; fc1 with bias and GELU in its epilogue, g kept in L2 and
    consumed by fc2 at once; saved: x, gelu'(h) and g as token pairs, as much memory as the
    dense autograd graph's x, h and g); otherwise (backend 'torch', or no extension) it is two
    :func:`block_sparse_linear` calls around ``F.gelu``.
    """
    _check_shapes(x, w1, layout1)
    _check_shapes(x.new_empty(0, layout1.out_features), w2, layout2)
    backend = _resolve_backend(backend)
    if backend == "torch":
        h = block_sparse_linear(x, w1, b1, layout1, "torch")
        return block_sparse_linear(F.gelu(h), w2, b2, layout2, "torch")
    x2 = x.reshape(-1, layout1.in_features).to(compute_dtype(x))
    y = _fused_mlp_call(x2, w1, b1, layout1, w2, b2, layout2, backend)
    return y.view(*x.shape[:-1], layout2.out_features)


def _fused_mlp_call(x2, w1, b1, lay1: BlockLayout, w2, b2, lay2: BlockLayout, backend="cpp"):
    """The fused C++ MLP op on 2-D ``x2`` (a seam for tests that count fused calls); backend
    'cpp' (AVX512-BF16) or 'amx' (tiles)."""
    args = (x2, w1, b1, lay1.kept, lay1.block_size, lay1.nnzb)
    lay = (lay2.kept, lay2.block_size, lay2.nnzb)
    return torch.ops.kiln.block_sparse_mlp(*args, w2, b2, *lay, backend)[0]


def block_sparse_linear(x, weight, bias, layout: BlockLayout, backend: str = "auto"):
    """``x @ W^T + b`` over the kept blocks of a dense-shaped W (backend 'auto', 'amx', 'cpp'
    or 'torch'): op ``kiln::block_sparse_linear``, grads for x, W (kept blocks; zeros elsewhere
    written in the same pass) and b. Computes in the dtype ``F.linear`` would (bf16 under
    autocast) with the torch backend, in bf16 with the C++ one; returns that dtype."""
    _check_shapes(x, weight, layout)
    backend = _resolve_backend(backend)
    x2 = x.reshape(-1, layout.in_features).to(compute_dtype(x))
    args = (layout.kept, layout.block_size, layout.nnzb, backend)
    y = torch.ops.kiln.block_sparse_linear(x2, weight, bias, *args)[0]
    return y.view(*x.shape[:-1], layout.out_features)


def masked_linear(x, weight, bias, mask):
    """Dense times mask: ``F.linear(x, weight * mask, bias)`` (gradient zero outside the mask)."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


class BlockSparseLinear(nn.Linear):
    """An nn.Linear whose weight is masked to kept blocks and whose forward is block-sparse.

    The weight stays a dense parameter (zeros outside kept blocks); the mask is a buffer, so it
    is saved and restored with the module's state_dict.
    """

    def __init__(self, in_features, out_features, mask, block_size=64, bias=True, backend="auto"):
        super().__init__(in_features, out_features, bias=bias)
        self.block_size, self.backend = block_size, backend
        self.register_buffer("mask", mask.to(torch.bool))
        self.layout = BlockLayout.from_mask(self.mask, block_size)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.layout = BlockLayout.from_mask(self.mask, self.block_size)

    def forward(self, x):
        return block_sparse_linear(x, self.weight, self.bias, self.layout, self.backend)


# ----------------------------------------------------------------------------- 2:4 (CUDA)


def semi_structured_available(device) -> bool:
    """True when torch's 2:4 semi-structured sparse matmul can run on ``device`` (CUDA only)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _semi_structured_linear(x, weight, bias, mask):
    from torch.sparse import to_sparse_semi_structured

    return F.linear(x, to_sparse_semi_structured(weight * mask.to(weight.dtype)), bias)


def dense_linear(x, weight, bias, mask):
    """Plain ``F.linear``: valid for a sparse layer because its weights outside the mask are
    exactly zero; the caller masks the weight gradient after backward (the sparsity callback
    does, for every kernel whose gradient is not masked already). Often the fastest choice where
    the dense matmul is very fast (AMX) and the sparse kernels are not."""
    return F.linear(x, weight, bias)


def prebuild() -> None:
    """Build (or find) the C++ kernels now and say which kernels this machine will use; run by
    ``make`` at install time so the first sparse run does not pay the few-second compile."""
    ext, amx = cpp_extension(), amx_extension()
    if amx is not None:
        print(f"kiln: block-sparse C++ kernels ready, AMX tiles ({amx.lib._name})")
    if ext is not None:
        print(f"kiln: block-sparse C++ kernels ready, AVX512-BF16 ({ext.lib._name})")
    else:
        print("kiln: no block-sparse C++ kernels on this machine; sparse runs use pure torch")


_CHOOSER = ("choose_kernel", "kernel_choice_reason", "rank_candidates")


def __getattr__(name: str):
    """The chooser moved to kiln.sparsity.choose; ``from kiln.sparsity.kernels import
    choose_kernel`` still works (imported lazily: choose imports this module)."""
    if name in _CHOOSER:
        from kiln.sparsity import choose

        return getattr(choose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from kiln.sparsity import ops as _ops  # noqa: E402,F401  registers the kiln:: custom ops
