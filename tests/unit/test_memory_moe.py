"""The memory estimate of MoE models: every expert in the parameters (and so in gradients and
optimizer state), and the activations an MoE layer keeps for backward, measured against the
tensors autograd saves."""

from __future__ import annotations

import pytest
import torch

from kiln.config import MoEConfig
from kiln.models.gpt import GPT, GPTConfig
from kiln.train.memory import activation_bytes, estimate_memory, moe_layer_bytes

BASE = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_head=8, d_ffn=64,
                 vocab_size=50, max_seq_len=16)  # fmt: skip


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in a forward, leaving out parameters and
    the input (and views of them): what the layer itself adds."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize(
    "variant",
    [{"activation": "gelu", "moe": {}}, {"activation": "swiglu", "bias": False, "moe": {}},
     {"activation": "gelu", "moe": {"top_k": 1, "d_expert": 64}},
     {"activation": "gelu", "moe": {"shared_experts": 1}},
     {"activation": "swiglu", "bias": False, "moe": {"z_loss_coef": 1e-3}}],
    ids=["gelu-top2", "swiglu-top2", "top1", "shared", "z-loss"],
)  # fmt: skip
def test_moe_layer_activations_match_what_autograd_saves(variant):
    moe = MoEConfig(**{"experts": 4, "top_k": 2, "d_expert": 16, **variant.pop("moe")})
    cfg = BASE.replace(moe=moe, **variant)
    torch.manual_seed(0)
    layer = GPT(cfg).blocks["0"].mlp.train()
    tokens = 64
    x = torch.randn(tokens, cfg.d_model, requires_grad=True)
    measured = saved_bytes(layer, x)
    # per-layer tensors of E elements (expert offsets, routed counts) are not per token
    assert measured == pytest.approx(tokens * moe_layer_bytes(cfg, 4), abs=16 * moe.experts)


def test_estimate_counts_every_expert_and_the_moe_activations():
    moe = MoEConfig(experts=4, top_k=1, d_expert=16, first_dense=1)
    cfg = BASE.replace(moe=moe)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    est = estimate_memory(cfg, micro_batch=2, seq_len=16)
    assert est.params == est.grads == 4 * n and est.optimizer == 8 * n
    # the MoE layer keeps its routed tensors instead of the dense MLP's up projections
    dense = activation_bytes(BASE, 2, 16, "fp32", False)
    extra = 2 * 16 * (moe_layer_bytes(cfg, 4) - 4 * 2 * BASE.d_ffn)
    assert activation_bytes(cfg, 2, 16, "fp32", False) == dense + extra
    fsdp = estimate_memory(cfg, micro_batch=2, seq_len=16, world_size=2, data="fsdp")
    moe_block = sum(p.numel() for p in GPT(cfg).blocks["1"].parameters())
    assert fsdp.params == 4 * (-(-n // 2)) + 4 * moe_block  # FSDP gathers the MoE block
