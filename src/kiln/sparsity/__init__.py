"""Sparse training: masks and patterns (patterns.py), sparse kernels (kernels.py) and the
per-layer kernel chooser (choose.py)."""

from kiln.sparsity.choose import choose_kernel
from kiln.sparsity.kernels import (
    BlockLayout,
    BlockSparseLinear,
    block_sparse_linear,
    masked_linear,
)
from kiln.sparsity.patterns import (
    Pattern,
    block_mask,
    mask_density,
    nm_mask,
    parse_pattern,
    unstructured_mask,
)

__all__ = [
    "BlockLayout",
    "BlockSparseLinear",
    "Pattern",
    "block_mask",
    "block_sparse_linear",
    "choose_kernel",
    "mask_density",
    "masked_linear",
    "nm_mask",
    "parse_pattern",
    "unstructured_mask",
]
