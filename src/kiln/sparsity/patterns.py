"""Sparsity masks: which weights of a linear layer are kept.

Every mask is a bool tensor of the weight's shape ``[out_features, in_features]`` (True = kept),
and every generator hits the requested level *exactly* or raises :class:`ConfigError`:

* ``unstructured_mask`` keeps the ``round(density * numel)`` largest ``|score|`` entries (the
  only generator that rounds, because any element count is a valid pattern).
* ``nm_mask`` (N:M) keeps the ``n`` largest ``|score|`` in every group of ``m`` consecutive
  *input* elements, so density is exactly ``n / m`` (2:4 is the GPU semi-structured format).
* ``block_mask`` keeps whole ``b x b`` blocks, scored by the L1 norm of the block. Balanced
  (the default) keeps exactly ``k = density * blocks_per_line`` blocks in every block-row
  (``axis="rows"``) or block-column (``axis="cols"``); free placement keeps the global top
  ``density * n_blocks`` blocks. A density that gives a non-integer ``k`` is refused (with the
  possible densities in the message) rather than rounded, so the level asked for is the level
  measured. Balancing along the longer dimension (block-rows of ``W2 = [768, 3072]``,
  block-columns of ``W1 = [3072, 768]``) gives the most possible levels: with ``b = 64`` there
  are 48 blocks per line, so every density ``j / 48`` works, including 1/2, 1/4, 1/8 and 1/16.

Pass ``torch.rand(shape)`` as ``scores`` for a random mask at initialisation, or the weight
itself for magnitude pruning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from kiln.errors import ConfigError

__all__ = [
    "Pattern",
    "block_mask",
    "mask_density",
    "nm_mask",
    "parse_pattern",
    "possible_block_densities",
    "unstructured_mask",
]


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern name: ``kind`` in {"unstructured", "nm", "block"}."""

    kind: str
    n: int = 0
    """Kept elements per group (N:M only)."""
    m: int = 0
    """Group length along the input dimension (N:M only)."""
    block_size: int | None = None
    """Block edge for "block<b>" names (None: the caller chooses)."""

    @property
    def name(self) -> str:
        """The canonical name, accepted back by :func:`parse_pattern`."""
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block" and self.block_size is not None:
            return f"block{self.block_size}"
        return self.kind


def parse_pattern(name: str) -> Pattern:
    """Parse 'unstructured', 'N:M' (e.g. '2:4') or 'block' / 'block64' into a :class:`Pattern`."""
    text = str(name).strip().lower()
    if text in ("unstructured", "block"):
        return Pattern(kind=text)
    if match := re.fullmatch(r"block(\d+)", text):
        size = int(match.group(1))
        _check_block_size(size)
        return Pattern(kind="block", block_size=size)
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match.group(1)), int(match.group(2))
        _check_nm(n, m)
        return Pattern(kind="nm", n=n, m=m)
    raise ConfigError(
        f"sparsity pattern {name!r} is not one of 'unstructured', 'N:M' (e.g. '2:4'), "
        "'block' or 'block<size>' (e.g. 'block64')."
    )


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of kept (True / nonzero) entries: 1 - sparsity."""
    return float(mask.count_nonzero()) / max(mask.numel(), 1)


def unstructured_mask(weight_or_scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` entries with the largest ``|score|`` (at least 1)."""
    _check_density(density)
    scores = weight_or_scores.detach().abs().float().flatten()
    keep = max(1, round(density * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, keep, sorted=False).indices] = True
    return mask.view(weight_or_scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M along the input dim: keep the ``n`` largest of every ``m`` consecutive inputs."""
    _check_nm(n, m)
    _check_2d(scores)
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features ({in_f}) divisible by M={m}.")
    groups = scores.detach().abs().float().reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, sorted=False).indices, True)
    return mask.view(out_f, in_f)


def block_mask(
    scores: torch.Tensor,
    density: float,
    block_size: int,
    balanced: bool = True,
    axis: str = "rows",
) -> torch.Tensor:
    """Keep whole ``block_size``-square blocks with the largest L1 ``|score|``.

    balanced: keep exactly ``density * blocks_per_line`` blocks in every block-row
    (``axis="rows"``) or block-column (``axis="cols"``); otherwise the global top
    ``density * n_blocks`` blocks (free placement).
    """
    _check_density(density)
    _check_block_size(block_size)
    _check_2d(scores)
    if axis not in ("rows", "cols"):
        raise ConfigError(f"block mask axis is {axis!r} but must be 'rows' or 'cols'.")
    out_f, in_f = scores.shape
    b = block_size
    if out_f % b or in_f % b:
        raise ConfigError(
            f"block size {b} does not divide the weight shape [{out_f}, {in_f}]; "
            "use a block size that divides both dimensions."
        )
    nbr, nbc = out_f // b, in_f // b
    block_scores = scores.detach().abs().float().reshape(nbr, b, nbc, b).sum(dim=(1, 3))
    if balanced and axis == "cols":
        block_scores = block_scores.t()
    per_line = block_scores.shape[1] if balanced else nbr * nbc
    keep = _exact_count(density, per_line, b, "block-" + axis[:-1] if balanced else "matrix")
    flat = block_scores if balanced else block_scores.reshape(1, -1)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept.scatter_(1, torch.topk(flat, keep, dim=1, sorted=False).indices, True)
    kept = kept.view(block_scores.shape)
    if balanced and axis == "cols":
        kept = kept.t()
    return kept.reshape(nbr, 1, nbc, 1).expand(nbr, b, nbc, b).reshape(out_f, in_f).contiguous()


def possible_block_densities(blocks_per_line: int) -> list[Fraction]:
    """Densities a balanced block mask can hit exactly: j / blocks_per_line for j = 1..n."""
    return sorted({Fraction(j, blocks_per_line) for j in range(1, blocks_per_line + 1)})


def _exact_count(density: float, per_line: int, block: int, where: str) -> int:
    """Return density * per_line if it is an integer (within float noise), else raise."""
    keep = density * per_line
    if abs(keep - round(keep)) > 1e-6 or round(keep) < 1:
        shown = ", ".join(str(f) for f in possible_block_densities(per_line)[:8])
        raise ConfigError(
            f"density {density} keeps {keep:g} of the {per_line} blocks of size {block} per "
            f"{where}, which is not a whole number; possible densities are j/{per_line} "
            f"({shown}, ...), or pick another block size or axis."
        )
    return round(keep)


def _check_density(density: float) -> None:
    if not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"density {density} is outside (0, 1]; use e.g. 0.125 for 87.5% sparse.")


def _check_nm(n: int, m: int) -> None:
    if n <= 0 or m <= 0 or n > m:
        raise ConfigError(f"N:M pattern {n}:{m} needs 0 < N <= M (e.g. 2:4).")


def _check_block_size(size: int) -> None:
    if size <= 0:
        raise ConfigError(f"block size {size} must be a positive integer (e.g. 64).")


def _check_2d(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ConfigError(
            f"masks are built for 2-D weights [out, in], got shape {list(scores.shape)}."
        )
