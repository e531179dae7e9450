"""Which matrices are sparse, how sparse each one is, and masks as groups of units.

Selection: parameter names matched by ``fnmatch`` globs (``include`` for the overall level,
``per_param`` keys for explicit levels); only weights of ``nn.Linear`` modules can be selected.

Distribution of the overall level over the selected matrices (``n_i`` = numel, ``K`` = kept
budget = (1 − level) · Σ n_i, minus what ``per_param`` overrides keep):

* uniform: every matrix gets density 1 − level (exact, or patterns.py raises).
* ERK (Evci et al. 2020, RigL): density_i = min(1, ε · (in_i + out_i) / (in_i · out_i)), with ε
  solved so Σ density_i · n_i = K; matrices capped at 1 are fixed dense and ε re-solved. For a
  block or N:M pattern each ERK density is then rounded to the nearest count the pattern can
  hold (whole blocks per block-row when balanced), so the overall level is hit approximately.

A mask is stored as ``kept``: a bool ``[groups, units]`` view. Units are elements
(unstructured, N:M) or ``b × b`` blocks; groups are what must keep a fixed count: the whole
matrix (unstructured, free block placement), each block-row/-column (balanced blocks) or each
run of M inputs (N:M). Pruning and regrowth work on this view, so structure is kept exactly.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import SparsityConfig
from kiln.errors import ConfigError
from kiln.sparsity.patterns import block_mask, nm_mask, parse_pattern, unstructured_mask


@dataclass(frozen=True)
class UnitSpec:
    """How an ``[out, in]`` mask is cut into units (b×b blocks or elements) and groups."""

    out_features: int
    in_features: int
    block: int = 1
    """Unit edge: 1 for elements, b for blocks."""
    groups: str = "all"
    """'all' (one group), 'rows' / 'cols' (one per unit row / column), 'nm' (runs of m)."""
    m: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.out_features // self.block, self.in_features // self.block

    @property
    def units_per_group(self) -> int:
        r, c = self.grid
        return {"all": r * c, "rows": c, "cols": r, "nm": self.m}[self.groups]

    def scores(self, t: torch.Tensor) -> torch.Tensor:
        """|t| summed per unit, as ``[groups, units]`` (float32)."""
        r, c = self.grid
        b = self.block
        s = t.detach().abs().float()
        if b > 1:
            s = s.reshape(r, b, c, b).sum(dim=(1, 3))
        return self._group(s.cpu())

    def to_units(self, mask: torch.Tensor) -> torch.Tensor:
        """A whole-unit bool mask ``[out, in]`` → kept ``[groups, units]``."""
        r, c = self.grid
        m = mask.detach().to(torch.bool)
        if self.block > 1:
            m = m.reshape(r, self.block, c, self.block).any(dim=3).any(dim=1)
        return self._group(m)

    def expand(self, kept: torch.Tensor) -> torch.Tensor:
        """Kept ``[groups, units]`` → bool mask ``[out, in]``."""
        r, c = self.grid
        g = kept
        if self.groups == "cols":
            g = g.t()
        g = g.reshape(r, c)
        if self.block > 1:
            b = self.block
            g = g.reshape(r, 1, c, 1).expand(r, b, c, b)
        return g.reshape(self.out_features, self.in_features).contiguous()

    def _group(self, grid: torch.Tensor) -> torch.Tensor:
        if self.groups == "all":
            return grid.reshape(1, -1)
        if self.groups == "rows":
            return grid
        if self.groups == "cols":
            return grid.t().contiguous()
        return grid.reshape(-1, self.m)  # nm: consecutive inputs of a row


def select_params(model: nn.Module, cfg: SparsityConfig) -> dict[str, float]:
    """{parameter name: explicit level or NaN (= share of the overall level)} for the matrices
    to make sparse; every glob must match at least one nn.Linear weight."""
    linears = linear_weights(model)
    names = [canonical(n) for n, _ in model.named_parameters()]
    chosen: dict[str, float] = {}
    if cfg.level > 0:
        for glob in cfg.include:
            hits = _matches(glob, names, linears, "sparsity.include")
            chosen.update({n: math.nan for n in hits})
    for glob, level in cfg.per_param.items():
        for name in _matches(glob, names, linears, "sparsity.per_param"):
            chosen[name] = level
    return {n: v for n, v in chosen.items() if not v == 0.0}


def _matches(glob: str, names: list[str], linears: dict, where: str) -> list[str]:
    hits = [n for n in names if fnmatch.fnmatchcase(n, glob)]
    if not hits:
        raise ConfigError(
            f"{where} glob {glob!r} matches no parameter of this model "
            f"(names look like {names[min(2, len(names) - 1)]!r})."
        )
    bad = [n for n in hits if n not in linears]
    if bad:
        raise ConfigError(
            f"{where} glob {glob!r} matches {bad[0]!r}, which is not an nn.Linear weight; "
            "only linear-layer matrices can be made sparse."
        )
    return hits


def canonical(name: str) -> str:
    """A parameter name without wrapper segments (activation checkpointing, torch.compile)."""
    parts = [p for p in name.split(".") if p not in ("_checkpoint_wrapped_module", "_orig_mod")]
    return ".".join(parts)


def linear_weights(model: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """{canonical weight name: (module path, nn.Linear)} for every linear layer."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[canonical(f"{path}.weight")] = (path, module)
    return out


def distribute(
    shapes: dict[str, tuple[int, int]], explicit: dict[str, float], level: float, how: str
) -> dict[str, float]:
    """{name: density}. ``explicit`` levels (NaN = share of ``level``) fix some matrices; the
    rest share the remaining kept budget uniformly or by ERK."""
    fixed = {n: 1.0 - v for n, v in explicit.items() if not math.isnan(v)}
    free = [n for n in shapes if n not in fixed]
    if not free:
        return fixed
    if how == "uniform":
        return {**fixed, **{n: 1.0 - level for n in free}}
    numel = {n: shapes[n][0] * shapes[n][1] for n in shapes}
    budget = (1.0 - level) * sum(numel[n] for n in free)
    raw = {n: sum(shapes[n]) / numel[n] for n in free}
    dense: set[str] = set()
    while True:
        rest = [n for n in free if n not in dense]
        eps = (budget - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    erk = {n: 1.0 if n in dense else eps * raw[n] for n in free}
    return {**fixed, **erk}


def unit_spec(cfg: SparsityConfig, name: str, shape: tuple[int, int]) -> UnitSpec:
    """The unit/group layout of ``name``'s mask for the configured pattern."""
    out_f, in_f = shape
    pat = parse_pattern(cfg.pattern)
    if pat.kind == "unstructured":
        return UnitSpec(out_f, in_f)
    if pat.kind == "nm":
        if in_f % pat.m:
            raise ConfigError(
                f"sparsity pattern {pat.name} needs {name}'s in_features ({in_f}) divisible by "
                f"M={pat.m}."
            )
        return UnitSpec(out_f, in_f, groups="nm", m=pat.m)
    b = pat.block_size or cfg.block_size
    if out_f % b or in_f % b:
        raise ConfigError(
            f"sparsity.block_size {b} does not divide {name}'s shape [{out_f}, {in_f}]; "
            "use a block size that divides both dimensions."
        )
    if not cfg.balanced:
        return UnitSpec(out_f, in_f, block=b)
    # balance along the longer dimension: more blocks per line = more possible levels
    return UnitSpec(out_f, in_f, block=b, groups="rows" if in_f >= out_f else "cols")


def quantize(density: float, spec: UnitSpec) -> float:
    """The nearest density the spec can hold exactly (at least one unit per group)."""
    per_group = spec.units_per_group
    return min(per_group, max(1, round(density * per_group))) / per_group


def initial_mask(
    cfg: SparsityConfig,
    name: str,
    spec: UnitSpec,
    density: float,
    weight: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """A bool ``[out, in]`` mask of exactly ``density`` built with patterns.py, scored by a
    random draw (init 'random') or ``|weight|`` (init 'magnitude')."""
    shape = (spec.out_features, spec.in_features)
    if cfg.init == "magnitude":
        scores = weight.detach().float().cpu()
    else:
        scores = torch.rand(shape, generator=gen)
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool)
    pat = parse_pattern(cfg.pattern)
    try:
        if pat.kind == "unstructured":
            return unstructured_mask(scores, density)
        if pat.kind == "nm":
            return nm_mask(scores, pat.n, pat.m)
        axis = "cols" if spec.groups == "cols" else "rows"
        return block_mask(scores, density, spec.block, balanced=cfg.balanced, axis=axis)
    except ConfigError as err:
        raise ConfigError(f"sparsity for {name}: {err}") from err


def keep_counts(kept: torch.Tensor) -> torch.Tensor:
    """Kept units per group, ``[groups]``."""
    return kept.sum(dim=1)
