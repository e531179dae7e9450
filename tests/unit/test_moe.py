"""The MoE layer: routing numerics against a per-token reference, capacity drops, balancing
losses, zero-token experts, init after meta → to_empty, config errors, and bitwise resume."""

import dataclasses
import math

import pytest
import torch

from kiln.config import JobConfig, MoEConfig, ParallelConfig
from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.moe import MoE, capacity, dispatch, pop_aux_loss
from kiln.train.moe import MoEBalance


def shape(**moe) -> GPTConfig:
    act = moe.pop("activation", "swiglu")
    return GPTConfig(
        n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_ffn=48, vocab_size=61,
        max_seq_len=16, position="rope", norm="rmsnorm", activation=act,
        bias=act != "swiglu", tie_embeddings=False,
        moe=MoEConfig(**{"experts": 4, "top_k": 2, "d_expert": 24, **moe}),
    )  # fmt: skip


def layer(**moe) -> MoE:
    torch.manual_seed(0)
    model = GPT(shape(**moe))
    return model.blocks["0"].mlp


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: Σ over its chosen experts of gate × expert MLP(x) (+ shared)."""
    e, out = moe.experts, []
    gates, choice, _, _ = moe.route(x)
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for g, j in zip(gates[t], choice[t]):
            h = e.w1[j] @ x[t] + (e.b1[j] if e.b1 is not None else 0)
            if e.w3 is not None:
                h = torch.nn.functional.silu(h) * (e.w3[j] @ x[t])
            else:
                h = torch.nn.functional.gelu(h)
            y = y + g * (e.w2[j] @ h + (e.b2[j] if e.b2 is not None else 0))
        out.append(y)
    out = torch.stack(out)
    if moe.shared is None:
        return out
    gate = torch.sigmoid(x @ moe.shared_gate.weight.t()) if moe.shared_gate is not None else 1
    return out + gate * moe.shared(x)


CASES = {
    "top2-softmax-swiglu": {},
    "top1-switch-gelu-bias": dict(top_k=1, activation="gelu"),
    "top2-sigmoid-normalized": dict(router="sigmoid", normalize_top_k=True),
    "shared-expert": dict(shared_experts=1, top_k=1),
    "gated-shared-experts": dict(shared_experts=2, shared_gate=True),
}


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_dropless_output_equals_per_token_reference(case, kernel):
    moe = layer(**CASES[case], kernel=kernel)
    x = torch.randn(20, 32)
    with torch.no_grad():
        assert torch.allclose(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_grouped_gemm_and_loop_agree_in_bf16_autocast_and_backward():
    moe = layer()
    x = torch.randn(40, 32, requires_grad=True)
    grads = {}
    for kernel in ("grouped", "loop"):
        moe.experts.kernel = kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads[kernel] = (y.detach().float(), x.grad.clone(), moe.experts.w1.grad.clone())
        x.grad = None
        moe.zero_grad()
    for a, b in zip(grads["grouped"], grads["loop"]):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_bf16_autocast_output_and_grads_are_within_bf16_error_of_fp32():
    """The rows are cast before they are gathered, so under autocast the k expert gradients
    of a token are summed in bf16: they stay within bf16 rounding of the fp32 layer's."""
    moe = layer(normalize_top_k=True)
    x = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 32)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = moe(x)
        y.backward(g)
        out[name] = [y.detach().float(), x.grad.clone(), moe.experts.w1.grad.clone(),
                     moe.experts.w2.grad.clone(), moe.router.weight.grad.clone()]  # fmt: skip
        x.grad = None
        moe.zero_grad()
    for a, b in zip(out["bf16"], out["fp32"]):
        assert (a - b).norm() / b.norm() < 2e-2


def test_capacity_drops_are_deterministic_counted_and_first_come():
    moe = layer(top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    x = torch.randn(16, 32)
    cap = capacity(16, 1, 4, 1.0)
    assert cap == 4
    moe.train()
    y1 = moe(x)
    assert int(moe.step_dropped) == 12 and moe.step_load.tolist() == [0, 0, 16, 0]
    y2 = moe(x)
    assert torch.equal(y1, y2) and int(moe.step_dropped) == 24
    kept = y1.detach().abs().sum(-1) > 0
    assert kept.tolist() == [True] * 4 + [False] * 12  # the first 4 tokens keep their slot
    plan = dispatch(torch.tensor([[2, 0], [2, 1], [2, 0]]), 4, capacity=2)
    # first choices first: tokens 0, 1 take expert 2's two slots; token 2's first choice drops
    assert plan.token.tolist() == [0, 2, 1, 0, 1] and plan.dropped == 1
    assert plan.counts.tolist() == [2, 1, 2, 0] and plan.routed.tolist() == [2, 1, 3, 0]


def test_aux_and_z_loss_equal_their_formulas():
    moe = layer(aux_loss_coef=0.1, z_loss_coef=0.01)
    moe.train()
    x = torch.randn(30, 32)
    moe(x)
    got = pop_aux_loss(torch.nn.ModuleList([moe]))
    scores, logits = moe.router(x)
    choice = scores.topk(2, dim=-1).indices
    f = torch.bincount(choice.flatten(), minlength=4).float() / (30 * 2)
    p = scores.mean(0)
    want = 0.1 * 4 * (f * p).sum() + 0.01 * (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-6)
    assert pop_aux_loss(torch.nn.ModuleList([moe])) is None  # collected once
    got.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    balanced = 4 * (torch.full((4,), 0.25) * torch.full((4,), 0.25)).sum()
    assert balanced.item() == pytest.approx(1.0)  # the balance term is 1 when perfectly even


def test_an_expert_with_no_tokens_gets_zero_gradient_and_no_error():
    for kernel in ("grouped", "loop"):
        moe = layer(kernel=kernel)
        with torch.no_grad():
            moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
        x = torch.randn(12, 32, requires_grad=True)
        moe.train()
        y = moe(x)
        assert moe.step_load[3] == 0
        y.square().sum().backward()
        assert torch.all(moe.experts.w1.grad[3] == 0) and moe.experts.w1.grad[:3].abs().sum() > 0
        assert torch.isfinite(x.grad).all()
    empty = moe(torch.zeros(0, 32))  # a micro-batch with no tokens at all
    assert empty.shape == (0, 32)


def test_meta_build_then_to_empty_init_is_deterministic_with_the_right_stds():
    cfg = shape().replace(d_model=64, d_head=16, moe=MoEConfig(experts=4, top_k=2, d_expert=256))
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.init_weights()
    moe = model.blocks["1"].mlp
    assert moe.experts.w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.experts.w2.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(moe.router.expert_bias == 0) and torch.all(moe.step_load == 0)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert "blocks.1.mlp.router.expert_bias" in first
    torch.manual_seed(3)
    model.init_weights()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params() and cfg.num_params(active=True) < n


def test_shared_expert_is_initialised_after_meta_build():
    """kiln train builds on meta and calls init_weights: the shared MLP must be initialised
    too (it was left as uninitialised memory, and training stopped on a NaN loss)."""
    cfg = shape(shared_experts=1, shared_gate=True).replace(d_model=64, d_head=16)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    shared = model.blocks["0"].mlp.shared
    assert shared.w1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks["0"].mlp.shared_gate.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_layer_placement_every_and_first_dense():
    model = GPT(shape(every=2, first_dense=1).replace(n_layers=5))
    kinds = [type(b.mlp).__name__ for b in model.blocks.values()]
    assert kinds == ["SwiGLUMLP", "SwiGLUMLP", "MoE", "SwiGLUMLP", "MoE"]
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(experts=4, top_k=5), "must not exceed moe.experts 4"),
        (dict(experts=4, capacity_factor=0.0), "capacity_factor is 0.0"),
        (dict(experts=4, router="topk"), "moe.router is 'topk'"),
        (dict(experts=4, top_k=1, normalize_top_k=True), "normalize_top_k"),
        (dict(experts=4, shared_gate=True), "shared_gate gates the shared experts but"),
    ],
)
def test_bad_moe_config_is_one_sentence(fields, words):
    with pytest.raises(ConfigError, match=words):
        MoEConfig(**fields)


def test_experts_must_divide_over_the_expert_parallel_degree():
    job = JobConfig(moe=MoEConfig(experts=6), parallel=ParallelConfig(expert=4))
    with pytest.raises(ConfigError, match="not divisible by parallel.expert 4"):
        job.validate(dp_size=4)


def _train(model, opt, steps, x, y):
    cb = MoEBalance(model)
    for _ in range(steps):
        loss = model(x, targets=y) + pop_aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        cb.after_optimizer_step(0)
    return cb


def test_resume_is_bitwise_including_the_expert_bias(tmp_path):
    from kiln.train import checkpoint as ckpt

    cfg = shape(bias_update_rate=0.01, aux_loss_coef=0.01)
    x = torch.randint(0, 61, (4, 16))
    y = torch.randint(0, 61, (4, 16))

    def fresh():
        torch.manual_seed(0)
        model = GPT(cfg)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = fresh()
    _train(model, opt, 3, x, y)
    meta = {"step": 3, "model_shape": dataclasses.asdict(model.config)}  # as kiln train saves
    ckpt.save_checkpoint(tmp_path, 3, model, opt, meta)
    _train(model, opt, 3, x, y)
    bias = model.blocks["0"].mlp.router.expert_bias
    assert bias.abs().sum() > 0  # the bias moved: it is real state
    model2, opt2 = fresh()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model2, opt2)
    _train(model2, opt2, 3, x, y)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_mup_treats_expert_weights_as_hidden_matrices():
    from kiln.models.mup import apply_mup, lr_multiplier

    cfg = apply_mup(shape(), base_width=16)
    mult = lr_multiplier(cfg)
    params = dict(GPT(cfg).named_parameters())
    assert mult("blocks.0.mlp.experts.w1", params["blocks.0.mlp.experts.w1"]) == 0.5
    assert mult("blocks.0.mlp.router.weight", params["blocks.0.mlp.router.weight"]) == 0.5
    assert mult("tok_emb.weight", params["tok_emb.weight"]) == 1.0


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--moe.experts", "4", "--moe.top_k", "8"], "must not exceed moe.experts 4"),
        (["--moe.experts", "6", "--parallel.expert", "4"], "not divisible by parallel.expert"),
        (["--moe.experts", "4", "--moe.capacity_factor", "0"], "capacity_factor is 0.0"),
        (["--moe.experts", "4", "--moe.router", "topk"], "moe.router is 'topk'"),
    ],
)
def test_bad_moe_flags_exit_2_with_one_sentence(tmp_path, capsys, flags, words):
    from kiln.cli import main

    assert main(["train", "--run.dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_plan_counts_total_and_active_parameters_of_the_switch_preset():
    from kiln.cli import _moe_plan_shape
    from kiln.models.presets import PRESETS
    from kiln.planning.plan import format_plan, make_plan

    switch = make_plan(preset="switch-cerebras-gpt-111m",
                       shape=_moe_plan_shape("switch-cerebras-gpt-111m"))  # fmt: skip
    dense = make_plan(preset="cerebras-gpt-111m")
    router = 10 * 8 * 768
    assert switch.active_params == dense.params + router
    assert switch.params == PRESETS["switch-cerebras-gpt-111m"].num_params()
    assert switch.params - switch.active_params == 10 * 7 * (2 * 768 * 3072 + 3072 + 768)
    assert switch.flops_model == pytest.approx(
        dense.flops_model / dense.tokens * switch.tokens + 6 * router * switch.tokens
    )
    assert "active per token (8 experts, top-1)" in format_plan(switch)


def test_activation_checkpointing_records_each_micro_batch_once():
    from torch.utils.checkpoint import checkpoint

    moe = layer(aux_loss_coef=0.1)
    moe.train()
    x = torch.randn(12, 32, requires_grad=True)
    y = checkpoint(moe, x, use_reentrant=False)
    aux = pop_aux_loss(torch.nn.ModuleList([moe]))
    (y.square().sum() + aux).backward()  # backward recomputes the forward
    assert moe.aux_loss is None and int(moe.step_load.sum()) == 12 * 2
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_layouts_that_do_not_compose_are_one_sentence():
    """MoE under PP is refused; under TP, with or without SP, it is accepted."""
    from kiln.distributed.parallel_dims import ParallelDims
    from kiln.distributed.parallelize import check_layout

    cfg = ParallelConfig(pipeline=2)
    dims = ParallelDims(0, 2, 0, torch.device("cpu"), pp=2)
    with pytest.raises(ConfigError, match="MoE models with parallel.pipeline > 1"):
        check_layout(shape(), cfg, dims, 8, sparse=False)
    for sp in (True, False):
        check_layout(shape(), ParallelConfig(tensor=2, sequence_parallel=sp),
                     ParallelDims(0, 2, 0, torch.device("cpu"), tp=2), 8, sparse=False)  # fmt: skip
