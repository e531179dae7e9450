"""Which layers of a shape are mixture-of-experts, and their total and active parameters and
model FLOPs per token.

A shape with ``moe.experts > 0`` replaces the dense MLP of every MoE layer (``is_moe_layer``)
by a router ``[E, d]``, ``E`` experts of width ``f_e`` (``moe.d_expert`` or ``d_ffn``) and
optionally one always-on shared MLP of width ``shared_experts · f_e``. Per MoE layer::

    total  = E·d + E·expert(f_e) + mlp(shared · f_e)
    active = E·d + k·expert(f_e) + mlp(shared · f_e)      (what one token multiplies with)

The counts are those of the op-level description (kiln.planning.ops, ``_moe_mlp``), which
holds the router, the grouped expert GEMMs and the shared MLP as ops like any other. Model
FLOPs (the MFU convention of kiln.planning.flops, 6·N_mm + 12·L·S·d_attn) count the *active*
matmul parameters; routing, sorting and the weighted combine are not counted (as Switch and
torchtitan count them), though ``kiln perf`` costs them as ops.
"""

from __future__ import annotations

from typing import Any

from kiln.planning import ops


def is_moe_layer(moe: Any, layer: int) -> bool:
    """Layer ``layer`` is MoE when experts exist, it is past ``first_dense`` and on ``every``."""
    return bool(moe is not None and moe.experts > 0 and layer >= moe.first_dense) and (
        layer % moe.every == 0
    )


def expert_width(shape: Any) -> int:
    """Hidden width of one routed expert."""
    return shape.moe.d_expert or shape.d_ffn


def n_moe_layers(shape: Any) -> int:
    """How many of the blocks hold an MoE MLP."""
    return sum(is_moe_layer(getattr(shape, "moe", None), i) for i in range(shape.n_layers))


def param_count(shape: Any, active: bool = False, include_embeddings: bool = True) -> int:
    """Total (or active per token) parameters of a dense or MoE shape."""
    return ops.param_count(shape, include_embeddings, active)


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs per training token on *active* parameters: 6·N_mm,active + 12·L·S·d_attn."""
    return ops.model_flops_per_token(shape, seq_len)
