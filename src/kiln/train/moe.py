"""The MoE layers' part in the training loop: expert-load metrics and the expert-bias update.

After each optimizer step the tokens routed to each expert (summed over micro-batches, and over
ranks under torch.distributed, so every rank applies the same update) move the DeepSeek-V3
balancing bias of layers with ``moe.bias_update_rate`` > 0. Each metrics line gets, per MoE
layer i, ``moe_load_max.i`` / ``moe_load_mean.i`` (tokens routed per expert per step, before
drops), ``moe_dropped.i`` (fraction of assignments dropped by the capacity), and the last
micro-batch's balance loss ``moe_aux_loss`` and z-loss ``moe_z_loss`` (means over layers,
unscaled by their coefficients). The bias lives in the model's state (a buffer), so it is
checkpointed with the weights and needs no state here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kiln.models.moe import MoE
from kiln.train.callbacks import Callback


class MoEBalance(Callback):
    """Reads each MoE layer's per-step load, updates its expert bias, reports the numbers."""

    name = "moe"

    def __init__(self, model: torch.nn.Module, copies: int = 1):
        """``copies``: ranks that route the same tokens (the tensor-parallel degree), by which
        the loads summed over all ranks are divided."""
        self.copies = copies
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
        self.names = [n.removesuffix(".mlp").split(".")[-1] for n, _ in found]
        self.layers = [m for _, m in found]
        self.window: dict[str, float] = {}
        self.steps = 0

    def after_optimizer_step(self, step: int) -> None:
        load = torch.stack([m.step_load for m in self.layers])
        dropped = torch.stack([m.step_dropped for m in self.layers])
        both = torch.cat([load, dropped[:, None]], dim=1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both)
        both = both / self.copies
        load, dropped = both[:, :-1], both[:, -1]
        for layer, layer_load in zip(self.layers, load):
            layer.update_expert_bias(layer_load)
            layer.reset_load()
        self._accumulate(load, dropped)

    def _accumulate(self, load: torch.Tensor, dropped: torch.Tensor) -> None:
        self.steps += 1
        for name, row, drop in zip(self.names, load, dropped):
            total = float(row.sum())
            for key, value in (
                (f"moe_load_max.{name}", float(row.max())),
                (f"moe_load_mean.{name}", float(row.mean())),
                (f"moe_dropped.{name}", float(drop) / total if total else 0.0),
            ):
                self.window[key] = self.window.get(key, 0.0) + value

    def metrics(self, step: int) -> dict[str, Any]:
        record = {k: v / max(self.steps, 1) for k, v in self.window.items()}
        self.window, self.steps = {}, 0
        for kind in ("aux", "z"):
            values = [float(m.last_losses[kind]) for m in self.layers]
            record[f"moe_{kind}_loss"] = sum(values) / len(values)
        return record
