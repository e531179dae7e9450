"""The op-level description (kiln.planning.ops): hand counts, torch's FLOP counter, and the
numbers derived from it (parameters, model FLOPs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.config import MoEConfig
from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.moe import GroupedExperts
from kiln.models.presets import PRESETS
from kiln.planning import ops

TINY = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_head=8, d_ffn=64,
                 vocab_size=50, max_seq_len=16)  # fmt: skip


def by_name(op_list, name):
    return next(o for o in op_list if o.name == name)


def test_hand_counts_of_one_linear_and_its_backward():
    B, T, d, f = 2, 16, 32, 64
    M = B * T
    o = ops.model_ops(TINY, ops.StepShape(batch=B, seq_len=T, precision="bf16"))
    w1 = by_name(o, "mlp.w1")
    assert w1.flops == 2 * M * d * f + M * f  # matmul + bias
    assert w1.bytes_read == M * d * 2 + d * f * 2  # bf16 input and bf16 weight copy
    assert w1.bytes_written == M * f * 2
    assert w1.count == TINY.n_layers and w1.params == d * f + f
    assert by_name(o, "mlp.w1.dgrad").flops == 2 * M * d * f
    assert by_name(o, "mlp.w1.wgrad").flops == 2 * M * d * f
    db = by_name(o, "mlp.w1.bias_grad")  # its own reduction kernel: reads dy, writes db
    assert (db.flops, db.bytes_read, db.bytes_written) == (M * f, M * f * 2, f * 2)
    cast = by_name(o, "mlp.w1.weight_cast")  # fp32 master → bf16 copy, once per forward
    assert (cast.bytes_read, cast.bytes_written) == (4 * d * f, 2 * d * f)
    softmax = by_name(o, "attn.softmax")
    assert softmax.bytes == 2 * (B * TINY.n_heads * T * T * 2)
    adam = by_name(ops.training_ops(TINY), "adamw")
    assert adam.bytes == 28 * TINY.num_params()


def test_sparsity_scales_flops_and_weight_bytes_not_activations():
    dense = ops.model_ops(TINY, ops.StepShape(batch=2, seq_len=16))
    sparse = ops.model_ops(TINY, ops.StepShape(batch=2, seq_len=16, density=0.125))
    d, s = by_name(dense, "mlp.w2"), by_name(sparse, "mlp.w2")
    assert s.flops - 2 * 16 * 32 == pytest.approx((d.flops - 2 * 16 * 32) * 0.125)  # bias dense
    assert s.bytes_written == d.bytes_written
    w = lambda o: next(t.bytes for t in o.reads if t.kind == "weight")  # noqa: E731
    assert w(s) == w(d) * 0.125
    assert by_name(sparse, "head").flops == by_name(dense, "head").flops  # head stays dense


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matmul_flops_agree_with_torch_flop_counter(precision):
    cfg = TINY.replace(bias=False)  # the counter counts 2·m·n·k, not bias adds
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            model(x, targets=x).backward()
    o = ops.model_ops(cfg, ops.StepShape(batch=2, seq_len=16, precision=precision))
    kinds = ("matmul", "attention") if precision == "bf16" else ("matmul",)
    # fp32 CPU attention runs SDPA's flash kernel, which the counter does not count
    expected = sum(op.flops * op.count for op in o if op.kind in kinds)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize(
    "variant",
    [{}, {"activation": "swiglu"}, {"parallel_block": True}, {"tie_embeddings": False},
     {"bias": False, "norm": "rmsnorm", "position": "rope"}],
    ids=["base", "swiglu", "parallel", "untied", "llama"],
)  # fmt: skip
def test_param_count_equals_the_module(name, variant):
    cfg = PRESETS[name].replace(**variant)
    with torch.device("meta"):
        model = GPT(cfg)
    assert ops.param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_model_flops_convention_from_the_ops():
    cfg = PRESETS["cerebras-gpt-111m"]
    n_mm = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    per_token = 6 * n_mm + 12 * cfg.n_layers * 2048 * cfg.n_heads * cfg.d_head
    assert ops.model_flops_per_token(cfg, 2048) == per_token


def test_bad_step_is_one_sentence():
    with pytest.raises(ConfigError, match="density"):
        ops.training_ops(TINY, ops.StepShape(density=0.0))
    with pytest.raises(ConfigError, match="precision"):
        ops.training_ops(TINY, ops.StepShape(precision="fp8"))


def test_norm_backward_reads_dy_and_x_twice():
    """dx in one pass, then the dγ/dβ reductions over tokens in another (the CPU kernel)."""
    B, T, d = 2, 16, 32
    M = B * T
    o = ops.model_ops(TINY, ops.StepShape(batch=B, seq_len=T, precision="fp32"))
    bwd = by_name(o, "mlp_norm.bwd")
    assert bwd.bytes_read == 2 * (M * d * 4 + M * d * 4) + 2 * d * 4  # (dy, x) twice + γ, β
    assert bwd.bytes_written == M * d * 4


# -- mixture-of-experts layers -------------------------------------------------------------
MOE_TINY = TINY.replace(bias=False, moe=MoEConfig(experts=4, top_k=2, d_expert=16))


def test_moe_hand_counts():
    B, T, d, E, k, fe = 2, 16, 32, 4, 2, 16
    M, R = B * T, B * T * k
    cfg = MOE_TINY.replace(bias=True, moe=MOE_TINY.moe)
    o = ops.model_ops(cfg, ops.StepShape(batch=B, seq_len=T, precision="bf16"))
    router = by_name(o, "moe.router")
    assert (router.flops, router.params, router.count) == (2 * M * d * E, E * d, 2)
    w1 = by_name(o, "moe.experts.w1")  # grouped GEMM over the M·k routed rows, + bias
    assert w1.flops == 2 * R * d * fe + R * fe
    assert w1.bytes_read == R * d * 2 + E * fe * d * 2  # routed rows + every expert's weight
    assert (w1.params, w1.active_params) == (E * (d * fe + fe), k * (d * fe + fe))
    assert by_name(o, "moe.experts.w2.dgrad").flops == 2 * R * fe * d
    assert by_name(o, "moe.experts.w2.wgrad").flops == 2 * R * fe * d
    assert by_name(o, "moe.experts.w2.bias_grad").flops == R * d  # its own reduction kernel
    assert by_name(o, "moe.router.scores").bytes_written == M * E * 4  # fp32 scores
    assert by_name(o, "moe.dispatch").bytes_written == R * d * 2
    assert by_name(o, "moe.combine").bytes_written == M * d * 2
    assert not [x for x in o if x.name.startswith("mlp.")]  # every layer is MoE
    # the weight gradients of all E experts are cast into fp32 .grad
    assert by_name(o, "moe.experts.w1.grad_cast").bytes_written == E * fe * d * 4


def test_moe_capacity_shared_experts_and_dense_layers():
    B, T, d, E, fe = 2, 16, 32, 4, 16
    M = B * T
    moe = MoEConfig(experts=E, top_k=2, d_expert=fe, capacity_factor=0.5, shared_experts=2,
                    first_dense=1)  # fmt: skip
    o = ops.model_ops(MOE_TINY.replace(moe=moe), ops.StepShape(batch=B, seq_len=T))
    R = E * math.ceil(0.5 * M * 2 / E)  # capacity slots: half of the M·k assignments
    assert by_name(o, "moe.experts.w1").flops == 2 * R * d * fe
    assert by_name(o, "moe.shared.w1").flops == 2 * M * d * 2 * fe  # all tokens, width 2·f_e
    assert by_name(o, "mlp.w1").count == 1 and by_name(o, "moe.router").count == 1
    # a capacity above the balanced load drops nothing: rows never exceed M·k
    assert ops.routed_rows(M, dataclasses.replace(moe, capacity_factor=4.0)) == 2 * M
    # FSDP gathers the largest block: the MoE one, with every expert
    blocks = ops.block_ops(MOE_TINY.replace(moe=moe), ops.StepShape(batch=1, seq_len=1))
    moe_block = sum(x.params for x in blocks if x.scope == "moe_block")
    assert ops.block_params(MOE_TINY.replace(moe=moe)) == moe_block
    assert moe_block > sum(x.params for x in blocks if x.scope == "block")


@pytest.mark.parametrize(
    "moe",
    [{}, {"shared_experts": 1}, {"every": 2, "first_dense": 1}, {"top_k": 1, "d_expert": None}],
    ids=["top2", "shared", "mixed-layers", "top1-full-width"],
)
def test_moe_param_counts_equal_the_module(moe):
    moe = MoEConfig(**{"experts": 4, "top_k": 2, "d_expert": 16, **moe})
    cfg = MOE_TINY.replace(bias=True, activation="swiglu", n_layers=3, moe=moe)
    model = GPT(cfg)
    assert ops.param_count(cfg) == sum(p.numel() for p in model.parameters())
    # active: all but the (E - k) experts a token skips
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    skipped = sum(p.numel() for m in experts for p in m.parameters()) * (
        1 - cfg.moe.top_k / cfg.moe.experts
    )
    assert ops.param_count(cfg, active=True) == sum(p.numel() for p in model.parameters()) - skipped


def test_moe_matmul_flops_agree_with_torch_flop_counter():
    """torch._grouped_mm is not counted by FlopCounterMode (torch 2.13), so the layer runs the
    per-expert loop, which computes the same M·k rows."""
    cfg = MOE_TINY.replace(moe=MoEConfig(experts=4, top_k=2, d_expert=16, kernel="loop"))
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(x, targets=x).backward()
    o = ops.model_ops(cfg, ops.StepShape(batch=2, seq_len=16, precision="fp32"))
    assert counter.get_total_flops() == sum(op.flops * op.count for op in o if op.kind == "matmul")


@pytest.mark.parametrize("name", ["switch-cerebras-gpt-111m", "mixtral-8x7b", "tiny-moe"])
def test_perf_model_flops_are_plans_active_flops(name):
    from kiln.cli import _moe_plan_shape
    from kiln.planning.hardware import perf_device
    from kiln.planning.perf import predict
    from kiln.planning.plan import make_plan

    plan = make_plan(preset=name, shape=_moe_plan_shape(name), seq_len=256)
    shape, step = plan.shape, ops.StepShape(batch=2, seq_len=256)
    report = predict(shape, step, perf_device("H100"), name)
    assert report.model_flops == pytest.approx(plan.flops_model / plan.tokens * step.tokens)
    # what the ops execute in matmuls is 6 FLOPs per active matmul weight per token (without
    # biases, which cost 2 FLOPs per token; norms hold parameters but no matmul) + attention
    shape = dataclasses.replace(shape, bias=False)
    report = predict(shape, step, perf_device("H100"), name)
    executed = sum(o.flops * o.count for o in ops.training_ops(shape, step)
                   if o.kind in ("matmul", "attention"))  # fmt: skip
    norms = sum(o.params * o.count for o in ops.model_ops(shape, step) if o.kind == "norm")
    assert executed == pytest.approx(report.model_flops - 6 * norms * step.tokens, rel=1e-12)
    assert any("active" in n for n in report.notes)
