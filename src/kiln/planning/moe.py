"""Total and active parameters, and model FLOPs per token, of mixture-of-experts shapes.

A shape with ``moe.experts > 0`` replaces the dense MLP of every MoE layer (``is_moe_layer``)
by a router ``[E, d]``, ``E`` experts of width ``f_e`` (``moe.d_expert`` or ``d_ffn``) and
optionally one always-on shared MLP of width ``shared_experts · f_e``. Per MoE layer::

    total  = E·d + E·mlp(f_e) + mlp(shared · f_e)
    active = E·d + k·mlp(f_e) + mlp(shared · f_e)      (what one token multiplies with)

``mlp(f) = n_up·(d·f + b·f) + f·d + b·d`` with n_up = 2 for SwiGLU, else 1. Model FLOPs (the
MFU convention of kiln.planning.flops, 6·N_mm + 12·L·S·d_attn) count the *active* matmul
parameters; routing, sorting and the weighted combine are not counted (as Switch and
torchtitan count them). Pure arithmetic on any shape object with the usual fields and ``moe``.
"""

from __future__ import annotations

from typing import Any

from kiln.planning import flops as dense


def is_moe_layer(moe: Any, layer: int) -> bool:
    """Layer ``layer`` is MoE when experts exist, it is past ``first_dense`` and on ``every``."""
    return bool(moe is not None and moe.experts > 0 and layer >= moe.first_dense) and (
        layer % moe.every == 0
    )


def expert_width(shape: Any) -> int:
    """Hidden width of one routed expert."""
    return shape.moe.d_expert or shape.d_ffn


def mlp_params(shape: Any, width: int) -> int:
    """One dense MLP of hidden width ``width`` (weights and biases)."""
    d, b = shape.d_model, int(getattr(shape, "bias", True))
    n_up = 2 if getattr(shape, "activation", "gelu") == "swiglu" else 1
    return n_up * (d * width + b * width) + width * d + b * d


def expert_params(shape: Any, width: int) -> int:
    """One routed expert (models.moe.GroupedExperts): up (and gate) and down weights, biases
    on the first up projection and the down projection only."""
    d, b = shape.d_model, int(getattr(shape, "bias", True))
    n_up = 2 if getattr(shape, "activation", "gelu") == "swiglu" else 1
    return n_up * d * width + width * d + b * (width + d)


def moe_mlp_params(shape: Any, active: bool = False) -> int:
    """One MoE layer's MLP: router + routed experts (all, or the top_k a token uses) + shared."""
    m, f = shape.moe, expert_width(shape)
    routed = (m.top_k if active else m.experts) * expert_params(shape, f)
    shared = mlp_params(shape, m.shared_experts * f) if m.shared_experts else 0
    return m.experts * shape.d_model + routed + shared


def n_moe_layers(shape: Any) -> int:
    """How many of the blocks hold an MoE MLP."""
    return sum(is_moe_layer(getattr(shape, "moe", None), i) for i in range(shape.n_layers))


def params_delta(shape: Any, active: bool) -> int:
    """Parameters an MoE shape has beyond the same shape with dense MLPs (0 when dense)."""
    n = n_moe_layers(shape)
    if n == 0:
        return 0
    return n * (moe_mlp_params(shape, active) - mlp_params(shape, shape.d_ffn))


def param_count(shape: Any, active: bool = False, include_embeddings: bool = True) -> int:
    """Total (or active per token) parameters of a dense or MoE shape."""
    return dense.param_count(shape, include_embeddings) + params_delta(shape, active)


def flops_per_token(shape: Any, seq_len: int) -> float:
    """Model FLOPs per training token on *active* parameters: 6·N_mm,active + 12·L·S·d_attn."""
    return dense.flops_per_token(shape, seq_len) + 6.0 * params_delta(shape, active=True)
