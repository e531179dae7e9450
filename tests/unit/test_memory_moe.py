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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in a forward, leaving out parameters and
    the input (and views of them): what the layer itself adds."""
    skip = {_local(p).untyped_storage().data_ptr() for p in module.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
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
    # the estimate models the grouped GEMM (kernel auto may time another kernel faster here)
    moe = MoEConfig(
        **{"experts": 4, "top_k": 2, "d_expert": 16, "kernel": "grouped", **variant.pop("moe")}
    )
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


def test_expert_terms_scale_as_one_over_the_expert_degree():
    """Under expert parallelism each rank holds E/ep experts: their parameters, gradients and
    AdamW moments scale as 1/ep (DDP: whole; FSDP2 with dp > ep: also 1/edp), on top of the
    dense rest, which does not change; the dispatch buffers are k·d per routed token."""
    from kiln.config import ParallelConfig
    from kiln.train.memory import estimate_layout_memory
    from kiln.train.memory_experts import expert_terms, routed_expert_params

    cfg = BASE.replace(n_layers=3, moe=MoEConfig(experts=8, top_k=2, d_expert=48, first_dense=1))
    model = GPT(cfg)
    n_e = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    layer = sum(p.numel() for p in model.blocks["1"].mlp.experts.parameters())
    assert routed_expert_params(cfg) == (n_e, layer)
    assert expert_terms(cfg, ParallelConfig(), 8, 32, "fp32") == expert_terms(
        BASE, ParallelConfig(expert=2), 8, 32, "fp32"
    )  # nothing to add: no expert parallelism, or no experts
    for data in ("ddp", "fsdp"):
        terms = {ep: expert_terms(cfg, ParallelConfig(expert=ep, data=data), 8, 32, "fp32")
                 for ep in (2, 4, 8)}  # fmt: skip
        shards = {ep: 8 // ep if data == "fsdp" else 1 for ep in terms}  # edp
        for ep, t in terms.items():
            assert t.optimizer == 8 * n_e // (ep * shards[ep]), (data, ep)
            gathered = 4 * layer // ep if shards[ep] > 1 else 0  # FSDP2 gathers one layer
            assert t.params == t.grads == 4 * n_e // (ep * shards[ep]) + gathered, (data, ep)
            k_rows = 2 * cfg.d_model * 4 + 8 * 2  # k rows and their int64 order
            assert t.dispatch == 32 * (2 * k_rows + 2 * 2 * cfg.d_model * 4)  # 2 MoE layers
        est = {ep: estimate_layout_memory(cfg, 16, 2, "fp32", 8, ParallelConfig(expert=ep,
               data="ddp"), device="cuda")[0] for ep in (2, 4)}  # fmt: skip
        assert est[2].optimizer - est[4].optimizer == 8 * n_e // 2 - 8 * n_e // 4
        assert est[2].layout == "ddp×8 ep2"
    # on a CPU, FSDP2's extra copy of the experts it shards is a kept heap's, as for the other
    # parameters: none with KILN_MALLOC_TUNING=memory (4 gloo ranks, FSDP2 edp 2 x EP2,
    # measured 0.82-0.85 of that estimate; 0.65-0.68 with the copy counted), none under DDP
    from kiln.train.memory import FSDP_CPU_EXTRA

    fsdp = ParallelConfig(expert=2, data="fsdp")
    kept = expert_terms(cfg, fsdp, 8, 32, "fp32", heap_kept=True)
    returned = expert_terms(cfg, fsdp, 8, 32, "fp32", heap_kept=False)
    assert kept.params - returned.params == FSDP_CPU_EXTRA * 4 * n_e // 2
    ddp = ParallelConfig(expert=2, data="ddp")
    assert expert_terms(cfg, ddp, 8, 32, "fp32", heap_kept=True) == expert_terms(
        cfg, ddp, 8, 32, "fp32", heap_kept=False
    )


def test_expert_parallel_saves_the_received_rows_in_addition(tmp_path):
    """The same MoE layer with its experts behind the all-to-all (one gloo rank: the same code
    path with a group of one) saves k·d elements and an int64 order of k more per token than
    without; memory_experts counts this per MoE layer."""
    import torch.distributed as dist

    from kiln.distributed.expert_parallel import apply_expert_parallel
    from kiln.train.memory_experts import expert_terms

    cfg = BASE.replace(n_layers=1, moe=MoEConfig(experts=4, top_k=2, d_expert=16))
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randn(64, cfg.d_model, requires_grad=True)
    plain = saved_bytes(model.blocks["0"].mlp, x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        apply_expert_parallel(model, dist.group.WORLD, log=lambda _: None)
        sharded = saved_bytes(model.blocks["0"].mlp, x)
    finally:
        dist.destroy_process_group()
    buffers = 64 * 2 * 2 * cfg.d_model * 4  # send and receive, once
    from kiln.config import ParallelConfig

    terms = expert_terms(cfg, ParallelConfig(expert=2), 2, 64, "fp32")
    assert sharded - plain == terms.dispatch - buffers == 64 * (2 * cfg.d_model * 4 + 8 * 2)


def test_tensor_parallel_shrinks_the_attention_of_an_moe_model_but_not_its_moe_layers():
    """Under TP an MoE layer runs whole on every tensor rank: going from tp 1 to tp 2 saves
    only the attention's split activations (q, k, v, output and its copy), not the layer's."""
    import dataclasses

    shape = dataclasses.replace(BASE, moe=MoEConfig(experts=4, top_k=2))
    q = kv = shape.n_heads * shape.d_head
    b, t = 2, 16
    one, two = (activation_bytes(shape, b, t, "fp32", False, tp=tp, embedding=False,
                                 head=False) for tp in (1, 2))  # fmt: skip
    assert one - two == b * t * shape.n_layers * (q + 2 * kv + 2 * q) // 2 * 4
