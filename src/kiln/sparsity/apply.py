"""Sparsity applied from outside the model: selected ``nn.Linear`` layers get a sparse forward.

Each selected linear layer is replaced in its parent by a :class:`SparseLinear` that holds the
*same* ``weight`` / ``bias`` Parameter objects, so parameter names (``blocks.0.mlp.w1.weight``),
the optimizer's references and its state, checkpoints and exports are unchanged — only the
forward differs. The mask is a plain attribute (not a buffer): it lives in the sparsity
callback's checkpoint state, never in the model's state_dict, so a sparse model's weights load
into any dense GPT (zeros stay zeros).

Kernels (one per layer, chosen when its mask is built or changes density):

* ``dense``: ``F.linear`` — when the mask keeps everything (before pruning starts, after SPDF's
  dense switch) and, for one step, at RigL updates (the dense weight gradient ``dyᵀ·x`` is what
  RigL grows by; the forward is identical because masked weights are exactly zero).
* ``masked``: :func:`kiln.sparsity.kernels.masked_linear` (dense × mask), any pattern.
* ``dense`` is also what a sparse layer runs when it is the fastest measured choice: the
  weights outside the mask are exactly zero, and the callback masks the weight gradient.
* ``block-amx`` / ``block-cpp`` / ``block-torch``:
  :func:`kiln.sparsity.kernels.block_sparse_linear` (AMX tiles, AVX512-BF16, pure torch),
  cost ∝ kept blocks.
* ``semi-2:4``: torch's 2:4 semi-structured matmul (CUDA, via choose_kernel).

A GELU MLP whose ``w1`` and ``w2`` are both sparse is swapped (:func:`fuse_mlps`) for a
:class:`SparseGeluMLP` holding the same two SparseLinear children (names unchanged). While both
use the same C++ block kernel (``block-amx`` or ``block-cpp``: bf16 compute, as the per-linear
kernel), neither runs dense this step and fusion is allowed (``fuse``: with ``kernel: auto`` the
callback times the fused kernel against the linears' own kernels, :mod:`kiln.sparsity.mlp_choice`,
and fuses only where it is faster), it calls the fused fc1 → exact GELU → fc2 kernel
:func:`kiln.sparsity.kernels.block_sparse_mlp` with the layouts the children rebuild on every
mask change; otherwise it is ``w2(gelu(w1 x))`` through the per-linear kernels. Only exact (erf)
GELU is fused: the kernel implements no tanh approximation, so ``gelu_tanh`` models keep the
per-linear path.

``kernel: auto`` asks :func:`kiln.sparsity.choose.choose_kernel` (timed once per shape and
density; every candidate's time is logged). The C++ block kernel computes in bf16, so an fp32
run chooses among ``dense``, ``masked`` and ``block-torch`` (which computes in fp32 there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.gpt import GeluMLP
from kiln.sparsity.choose import choose_kernel, kernel_choice_reason
from kiln.sparsity.kernels import (
    BlockLayout,
    amx_extension,
    block_sparse_linear,
    block_sparse_mlp,
    cpp_extension,
    masked_linear,
)

KERNELS = ("dense", "masked", "block-amx", "block-cpp", "block-torch", "semi-2:4")
FUSED_KERNELS = ("block-amx", "block-cpp")
"""Block kernels with a fused MLP kernel (the C++ builds)."""


class SparseLinear(nn.Module):
    """A linear layer's forward through a sparse kernel, sharing the layer's Parameters."""

    def __init__(self, linear: nn.Linear, block_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: names and optimizer unchanged
        self.bias = linear.bias
        self.block_size = block_size
        self.mask = torch.ones_like(linear.weight, dtype=torch.bool)
        self.keep = torch.ones_like(linear.weight)
        self.kernel = "dense"
        self.dense_now = False
        """Run dense for this step (RigL's dense-gradient steps)."""
        self._layout: BlockLayout | None = None
        self._fn: Callable | None = None

    def set_mask(self, mask: torch.Tensor, kernel: str, fn: Callable | None = None) -> None:
        """Use ``mask`` (bool ``[out, in]``) with ``kernel`` (one of KERNELS) from now on."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown sparse kernel {kernel!r}")
        self.mask = mask.to(self.weight.device, torch.bool)
        self.keep = self.mask.to(self.weight.dtype)
        """The mask in the weight's dtype: multiplying by it skips a bool→float copy per use."""
        self.kernel, self._fn = kernel, fn
        is_block = kernel.startswith("block")
        self._layout = BlockLayout.from_mask(self.mask, self.block_size) if is_block else None

    @property
    def grad_is_masked(self) -> bool:
        """True when this step's weight gradient comes out exactly zero outside the mask (the
        masked and block kernels), so masking it again would change nothing."""
        return not self.dense_now and (self.kernel == "masked" or self.kernel.startswith("block"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_now or self.kernel == "dense":
            return F.linear(x, self.weight, self.bias)
        if self._layout is not None:
            backend = self.kernel.split("-", 1)[1]
            return block_sparse_linear(x, self.weight, self.bias, self._layout, backend)
        if self._fn is not None:
            return self._fn(x, self.weight, self.bias, self.mask)
        return masked_linear(x, self.weight, self.bias, self.mask)

    def extra_repr(self) -> str:
        density = float(self.mask.float().mean())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}, density={density:.4f}"
        )


def swap_in(model: nn.Module, path: str, block_size: int) -> SparseLinear:
    """Replace the nn.Linear at module ``path`` by a SparseLinear sharing its Parameters."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    linear = getattr(parent, child)
    if isinstance(linear, SparseLinear):
        return linear
    sparse = SparseLinear(linear, block_size)
    setattr(parent, child, sparse)
    return sparse


class SparseGeluMLP(nn.Module):
    """``w2(gelu(w1 x))`` with both linears sparse: fused block-sparse kernel when it applies.

    Holds the GeluMLP's own SparseLinear children as ``w1`` / ``w2``, so parameter names
    (``blocks.0.mlp.w1.weight``), the optimizer's references and the sparsity callback's
    ``Layer.module`` are unchanged; masks, kernels, layouts and ``dense_now`` stay per linear.
    """

    def __init__(self, w1: SparseLinear, w2: SparseLinear) -> None:
        super().__init__()
        self.w1, self.w2 = w1, w2
        self.fuse = True
        """False where the chooser timed the linears' own kernels faster than the fused one."""

    @property
    def fused(self) -> bool:
        """True when the next forward runs the fused kernel: fusion allowed, both linears on the
        same C++ block kernel (block-amx or block-cpp), neither dense this step."""
        w1, w2 = self.w1, self.w2
        return (
            self.fuse
            and w1.kernel == w2.kernel
            and w1.kernel in FUSED_KERNELS
            and all(not m.dense_now and m._layout is not None for m in (w1, w2))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w1, self.w2
        if self.fused:
            backend = w1.kernel.split("-", 1)[1]
            return block_sparse_mlp(
                x, w1.weight, w1.bias, w2.weight, w2.bias, w1._layout, w2._layout, backend
            )
        return w2(F.gelu(w1(x)))


def fuse_mlps(model: nn.Module) -> list[str]:
    """Swap every exact-GELU GeluMLP whose w1 and w2 are both SparseLinear for a SparseGeluMLP.

    Returns the swapped module paths. tanh-GELU MLPs are left alone (the fused kernel computes
    the exact erf GELU only).
    """
    swapped = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, GeluMLP) or module.approximate != "none":
            continue
        if not (isinstance(module.w1, SparseLinear) and isinstance(module.w2, SparseLinear)):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, SparseGeluMLP(module.w1, module.w2))
        swapped.append(path)
    return swapped


def block_backend() -> str:
    """The block kernel ``sparsity.kernel: block`` uses here: the fastest build this machine
    runs (AMX tiles, else AVX512-BF16, else pure torch)."""
    if amx_extension() is not None:
        return "block-amx"
    return "block-cpp" if cpp_extension() is not None else "block-torch"


def pick_kernel(
    requested: str,
    pattern: str,
    block_size: int,
    shape: tuple[int, int],
    density: float,
    tokens: int,
    precision: str,
    device: torch.device,
) -> tuple[str, Callable | None, str]:
    """(kernel, fn for semi-2:4 else None, reason) for one layer at ``density``.

    ``auto`` times every candidate on this shape (:func:`choose_kernel`): the dense matmul,
    masked-dense and the sparse kernels the pattern allows in this precision (in fp32 only the
    torch block kernel: the C++ kernels compute in bf16). The fastest wins, so a sparse layer
    never runs measurably slower than its dense twin.
    """
    if density >= 1.0:
        return "dense", None, "mask keeps every weight"
    if requested in ("masked", "dense"):
        return requested, None, f"sparsity.kernel is {requested!r}"
    if requested == "block":
        backend = block_backend()
        return backend, None, "sparsity.kernel is 'block'"
    is_block = pattern == "block" and block_size % 32 == 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if is_block or (pattern == "2:4" and precision == "bf16"):
        name_pattern, why = (f"block{block_size}" if is_block else pattern), ""
    else:
        name_pattern = "unstructured"
        detail = f"block size {block_size}" if pattern == "block" else f"pattern {pattern!r}"
        why = f"no sparse kernel for {detail} in {precision}; "
    out_f, in_f = shape
    args = (out_f, in_f, tokens, name_pattern, density, dtype, device)
    name, fn = choose_kernel(*args)
    reason = why + (kernel_choice_reason(*args) or name)
    if name.startswith("block"):
        return "block-" + name.split("-", 1)[1], None, reason
    if name.startswith("semi"):
        return "semi-2:4", fn, reason
    return ("dense" if name == "dense" else "masked"), None, reason
