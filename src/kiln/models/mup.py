"""μP (maximal update parametrization) as data on the model config — the Cerebras-GPT rules.

μP (Yang et al. 2021, "Tensor Programs V") makes the best hyperparameters of a small *base*
model carry over to wider ones: activations, logits and per-step updates stay O(1) as the width
grows, so one LR and one init scale work at every width. Cerebras-GPT (Dey et al. 2023,
appendix) tuned at base width 256 and applies, with width multiplier ``m = d_model / base``:

====================  ===========================  ==============================================
quantity              standard (SP)                μP
====================  ===========================  ==============================================
embedding output      tok + pos                    (tok + pos) × 10          (embedding_multiplier)
attention logits      q·k / sqrt(d_head)           q·k / d_head              (attn_scale)
output logits         h · Wᵀ                       h · Wᵀ × 1/m              (output_multiplier)
hidden init std       0.02                         0.08 / sqrt(m)            (init_std)
output projections    init_std / sqrt(2L)          init_std / sqrt(2L)       (the model does this)
embedding init std    0.02                         0.08                      (embed_init_std)
Adam LR, hidden W     η                            η / m                     (lr_multiplier)
Adam LR, the rest     η                            η (embeddings, biases, norm gains)
====================  ===========================  ==============================================

"Hidden W" are the 2-D weights inside the transformer blocks (q, k, v, o, MLP up/down): the
matrices whose both dimensions grow with width, whose Adam updates would otherwise grow ∝ m.
At ``d_model == base_width`` μP differs from SP only in the constants, not in the scaling.
Everything here is data: :func:`apply_mup` returns a new :class:`GPTConfig`, and
:func:`lr_multiplier` a function the optimizer builder calls per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kiln.errors import ConfigError
from kiln.models.gpt import GPTConfig

EMBEDDING_MULTIPLIER = 10.0
"""Cerebras-GPT's tuned μP input multiplier (alpha_input)."""
BASE_INIT_STD = 0.08
"""Cerebras-GPT's tuned base init std (at the base width), for hidden and embedding weights."""


def width_multiplier(shape: GPTConfig, base_width: int = 256) -> float:
    """``m = d_model / base_width``."""
    if not base_width > 0:
        raise ConfigError(f"model.mup_base_width is {base_width} but must be > 0.")
    return shape.d_model / base_width


def apply_mup(shape: GPTConfig, base_width: int = 256) -> GPTConfig:
    """``shape`` with the Cerebras-GPT μP multipliers and init set (see the module table)."""
    m = width_multiplier(shape, base_width)
    return shape.replace(
        width_mult=m,
        embedding_multiplier=EMBEDDING_MULTIPLIER,
        output_multiplier=1.0 / m,
        attn_scale=1.0 / shape.d_head,
        init_std=BASE_INIT_STD / math.sqrt(m),
        embed_init_std=BASE_INIT_STD,
    )


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (``blocks.{i}....weight``), or a 3-D stack of
    MoE expert weights ``[E, out, in]`` (each expert is a hidden matrix; the router too)."""
    return param.ndim in (2, 3) and (name.startswith("blocks.") or ".blocks." in name)


def lr_multiplier(shape: GPTConfig) -> Callable[[str, torch.Tensor], float]:
    """Per-parameter Adam LR multiplier: 1/m for hidden matrices, 1 for everything else.

    ``m`` is read from ``shape.width_mult``, so call this on the config :func:`apply_mup`
    returned.
    """
    m = float(shape.width_mult)

    def mult(name: str, param: torch.Tensor) -> float:
        return 1.0 / m if is_hidden_matrix(name, param) else 1.0

    return mult
