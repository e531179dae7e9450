"""AdamW with decoupled weight decay on matrices only, and the warm-up + decay LR schedule.

Cerebras-GPT recipe: AdamW β = (0.9, 0.95), weight decay 0.1 on weight matrices (not biases,
norm gains or embedding tables), linear warm-up then cosine or linear decay to 10% of the peak.
μP changes only the per-parameter LR multipliers (``lr_mult``), which arrive as data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kiln.config import TrainConfig

EMBEDDING_NAMES = ("tok_emb", "pos_emb")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices that are not embedding tables."""
    return param.ndim >= 2 and not any(part in EMBEDDING_NAMES for part in name.split("."))


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    lr_mult: Callable[[str, torch.Tensor], float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, grouped by (decay, LR multiplier).

    Each group carries ``lr_mult``; :class:`LRSchedule` sets ``group["lr"] = lr(step) * lr_mult``.
    """
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    names: dict[tuple[bool, float], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (decays(name, param), float(lr_mult(name, param)) if lr_mult else 1.0)
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    param_groups = [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_mult": mult,
            "lr": cfg.lr * mult,
            "names": names[(decay, mult)],
        }
        for (decay, mult), params in sorted(groups.items())
    ]
    params = [p for group in param_groups for p in group["params"]]
    return torch.optim.AdamW(
        param_groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=_fused_ok(params),
    )


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all tensors: measured 0.07 s vs 0.23–0.56 s for
    foreach on a 111M model on CPU) for plain CPU/CUDA floating-point parameters; FSDP2's
    DTensor shards keep the foreach implementation."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in params
    )


class LRSchedule:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine or linear decay to
    ``min_ratio × peak`` at ``total`` steps (and constant after).

    lr(s) = peak · s / warmup                                  for s < warmup
    lr(s) = peak · (r + (1 − r) · f(p)),  p = (s − warmup) / (total − warmup)
            f(p) = ½(1 + cos πp)  (cosine)   or   1 − p  (linear)
    The schedule is a pure function of the step; its state_dict records its shape so a resumed
    run can check it continues the same schedule.
    """

    def __init__(self, peak: float, warmup: int, total: int, min_ratio: float, decay: str):
        self.peak, self.warmup, self.total = peak, warmup, total
        self.min_ratio, self.decay = min_ratio, decay

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        p = min(1.0, (step - self.warmup) / span)
        f = 0.5 * (1.0 + math.cos(math.pi * p)) if self.decay == "cosine" else 1.0 - p
        return self.peak * (self.min_ratio + (1.0 - self.min_ratio) * f)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR for ``step``; return the base (multiplier 1) LR."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {
            "peak": self.peak,
            "warmup": self.warmup,
            "total": self.total,
            "min_ratio": self.min_ratio,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict) -> None:
        # The step lives in the trainer state; a resumed run may extend ``total`` on purpose.
        self.peak, self.warmup = state["peak"], state["warmup"]
        self.min_ratio, self.decay = state["min_ratio"], state["decay"]


class Optimizers:
    """One optimizer per model part (pipeline stage), stepped as one: checkpoints save each
    with its own part, keyed by parameter name, so any layout can reload them."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
