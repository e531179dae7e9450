"""The op-level description (kiln.planning.ops): hand counts, torch's FLOP counter, and the
numbers derived from it (parameters, model FLOPs)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.presets import PRESETS
from kiln.planning import ops
from kiln.planning.moe import params_delta

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
    # MoE layers are not ops yet: their experts are what planning.moe adds to the dense MLP
    extra = params_delta(cfg, active=False)
    assert ops.param_count(cfg) + extra == sum(p.numel() for p in model.parameters())


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
