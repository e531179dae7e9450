"""Training callbacks: the seam where optional components (sparsity, ...) join the loop.

A callback sees the step at fixed points — after backward (gradients present, before
clipping), after the optimizer step — and may add numbers to the metrics line. Its
``state_dict()`` is split by :func:`split_state` into tensors (saved in the DCP checkpoint) and
plain values (saved in kiln.json), so a resumed run restores it exactly.
"""

from __future__ import annotations

from typing import Any

import torch


class Callback:
    """Base class: every hook is optional."""

    name = "callback"

    def after_backward(self, step: int) -> None:
        """Gradients of this step are complete and unclipped."""

    def after_optimizer_step(self, step: int) -> None:
        """Parameters have been updated for ``step``."""

    def metrics(self, step: int) -> dict[str, Any]:
        """Extra fields for this step's metrics line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output."""


def split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, plain JSON-able values) of a flat state dict."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return tensors, plain
