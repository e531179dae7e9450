"""Sparse-training schedules and mask updates, as pure functions on ``kept [groups, units]``.

Steps are counted as *completed optimizer steps* ``t`` (the hook after step index ``s`` sees
``t = s + 1``); a mask change at ``t`` is in force from step index ``t`` on.

* GMP (Zhu & Gupta 2017): at t = t0, t0 + Δt, …, t0 + nΔt the level is
  s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (nΔt))³ with s_i = 0 (dense start); each update
  keeps the largest-|w| units of those still kept, the same count in every group.
* SET (Mocanu et al. 2018) and RigL (Evci et al. 2020): every ΔT steps until T_end, drop the
  ``round(α_t · nnz)`` kept units of smallest |w| (over the whole matrix) and regrow, in every
  group, as many units as it lost: at random (SET) or by largest dense-gradient |g| (RigL).
  α_t = α/2 · (1 + cos(π t / T_end)). nnz per group — hence per matrix — stays constant, and
  regrown units start at zero (their weights and Adam moments are zeroed by the caller).
* SPDF (Thangarasa et al. 2023): sparse pre-training until ``dense_step``, then all masks drop.
"""

from __future__ import annotations

import math

import torch


def gmp_level(t: int, final: float, start: int, end: int, every: int) -> float:
    """Target level after ``t`` completed steps (constant between pruning updates)."""
    if t < start:
        return 0.0
    span = end - start
    done = min(t, end) - start
    done -= done % every if t < end else 0  # last update at or before t
    return final * (1.0 - (1.0 - done / span) ** 3)


def gmp_update_due(t: int, start: int, end: int, every: int) -> bool:
    """True when the GMP level changes at ``t``."""
    return start <= t <= end and ((t - start) % every == 0 or t == end)


def update_fraction(t: int, alpha: float, t_end: int) -> float:
    """Cosine-decayed drop fraction α_t = α/2 · (1 + cos(π t / T_end))."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * min(t, t_end) / max(t_end, 1)))


def dst_update_due(t: int, every: int, t_end: int) -> bool:
    """SET/RigL change masks at t = ΔT, 2ΔT, … up to and including T_end."""
    return 0 < t <= t_end and t % every == 0


def prune_to(kept: torch.Tensor, scores: torch.Tensor, keep_per_group: int) -> torch.Tensor:
    """Keep the ``keep_per_group`` highest-scoring units of each group among those kept."""
    if keep_per_group >= int(kept.sum(dim=1).min()):
        return kept
    masked = scores.masked_fill(~kept, -math.inf)
    idx = torch.topk(masked, keep_per_group, dim=1, sorted=False).indices
    return torch.zeros_like(kept).scatter_(1, idx, True)


def drop_and_grow(
    kept: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new kept, grown) after dropping ``round(fraction · nnz)`` lowest-``drop_scores`` kept
    units (anywhere in the matrix) and regrowing, per group, as many as that group lost, taken
    by highest ``grow_scores`` among units not kept after the drop (a just-dropped unit may be
    regrown; it restarts from zero like any grown unit)."""
    n_drop = round(fraction * int(kept.sum()))
    if n_drop == 0:
        return kept, torch.zeros_like(kept)
    flat = drop_scores.masked_fill(~kept, math.inf).flatten()
    dropped = torch.zeros_like(kept).flatten()
    dropped[torch.topk(flat, n_drop, largest=False, sorted=False).indices] = True
    dropped = dropped.view_as(kept)
    after = kept & ~dropped
    lost = dropped.sum(dim=1, keepdim=True)
    candidates = grow_scores.float().masked_fill(after, -math.inf)
    order = torch.argsort(candidates, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand_as(order).contiguous()
    )
    grown = rank < lost
    return after | grown, grown
