"""The GPT's per-layer building blocks other than attention: the norm (LayerNorm or RMSNorm),
the dense MLPs (GELU, SwiGLU), the choice between them and an MoE layer, and weight init."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.moe import MoE
from kiln.planning.moe import expert_width, is_moe_layer

if TYPE_CHECKING:
    from kiln.models.gpt import GPTConfig


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)); 'tanh' approximation for GPT-2's gelu_new."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_linears(self, [self.w1], init_std)
        init_linears(self, [self.w2], out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


class SwiGLUMLP(nn.Module):
    """w2(silu(w1 x) * w3 x) — HF Llama gate_proj = w1, up_proj = w3, down_proj = w2."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ffn, cfg.d_model, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ffn, bias=cfg.bias)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        init_linears(self, [self.w1], init_std)  # parameter order w1, w2, w3 (the RNG order)
        init_linears(self, [self.w2], out_std)
        init_linears(self, [self.w3], init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def init_linears(_owner: nn.Module, linears: list[nn.Linear], std: float) -> None:
    """Weights N(0, std), biases 0, in list order (the order fixes the RNG stream)."""
    for linear in linears:
        nn.init.normal_(linear.weight, 0.0, std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


def make_norm(cfg: GPTConfig, width: int | None = None) -> nn.Module:
    """The model's norm over ``width`` features (default d_model)."""
    width = width or cfg.d_model
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=cfg.norm_eps)
    return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


def make_mlp(cfg: GPTConfig, layer: int = 0) -> nn.Module:
    """The MLP of block ``layer``: dense, or an MoE layer where cfg.moe places one."""
    if is_moe_layer(cfg.moe, layer):
        width = cfg.moe.shared_experts * expert_width(cfg)
        return MoE(cfg, shared=make_mlp(cfg.replace(d_ffn=width, moe=None)) if width else None)
    return SwiGLUMLP(cfg) if cfg.activation == "swiglu" else GeluMLP(cfg)
