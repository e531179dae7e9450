"""The LR schedule and the AdamW weight-decay groups (kiln.train.optim), checked against values
computed by hand from the formulas, and by what one AdamW step does to each parameter."""

import math

import pytest
import torch

from kiln.config import TrainConfig
from kiln.models.gpt import GPT, GPTConfig
from kiln.train.optim import LRSchedule, build_optimizer

# peak 1, warm-up 4 steps, decay over steps 4..14 to 10% of the peak
PEAK, WARMUP, TOTAL, FLOOR = 1.0, 4, 14, 0.1


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_is_linear_and_reaches_the_peak(decay):
    lr = LRSchedule(PEAK, WARMUP, TOTAL, FLOOR, decay)
    assert [lr(s) for s in range(WARMUP)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(WARMUP) == pytest.approx(1.0)  # decay starts from the peak


def test_cosine_decay_to_the_floor():
    lr = LRSchedule(PEAK, WARMUP, TOTAL, FLOOR, "cosine")
    # p = 2/10: 0.1 + 0.9 * (1 + cos(0.2π)) / 2 = 0.1 + 0.9 * 0.904508...
    assert lr(6) == pytest.approx(0.1 + 0.9 * 0.9045084971874737)
    assert lr(9) == pytest.approx(0.55)  # half way: half way between peak and floor
    assert lr(12) == pytest.approx(0.1 + 0.9 * 0.0954915028125263)
    assert lr(TOTAL) == pytest.approx(0.1)
    assert lr(TOTAL + 50) == pytest.approx(0.1)  # constant after the end


def test_linear_decay_to_the_floor():
    lr = LRSchedule(2.0, WARMUP, TOTAL, 0.25, "linear")
    assert [lr(s) for s in (4, 6, 9, 14, 30)] == pytest.approx([2.0, 1.7, 1.25, 0.5, 0.5])


def test_no_warmup_and_zero_floor():
    lr = LRSchedule(1.0, 0, 10, 0.0, "linear")
    assert [lr(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_resume_with_a_longer_run_stretches_the_decay():
    """``--resume --train.max_steps`` builds the schedule for the new total, then loads the
    saved one: warm-up, peak, floor and decay come from the checkpoint, the total stays new."""
    saved = LRSchedule(PEAK, WARMUP, TOTAL, FLOOR, "cosine").state_dict()
    resumed = LRSchedule(5.0, 1, 24, 0.5, "linear")  # what a changed config would build
    resumed.load_state_dict(saved)
    want = LRSchedule(PEAK, WARMUP, 24, FLOOR, "cosine")
    assert [resumed(s) for s in range(30)] == pytest.approx([want(s) for s in range(30)])
    assert resumed(TOTAL) > 0.5  # the old end is now mid-decay, not the floor
    assert resumed(24) == pytest.approx(0.1)


def test_apply_sets_every_group_lr_times_its_multiplier():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr_mult": 0.25}, {"params": [params[1]]}])
    base = LRSchedule(PEAK, WARMUP, TOTAL, FLOOR, "cosine").apply(opt, 1)
    assert base == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.125, 0.5])


def _model(tie: bool) -> GPT:
    shape = GPTConfig(n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, d_head=8, d_ffn=32,
                      vocab_size=40, max_seq_len=8, position="learned", norm="layernorm",
                      bias=True, tie_embeddings=tie)  # fmt: skip
    model = GPT(shape)
    model.init_weights()
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_matrices_not_biases_norms_or_embeddings(tie):
    """One AdamW step with zero gradients moves a parameter only through weight decay:
    decayed ones shrink by exactly (1 − lr·wd), the others stay put."""
    model = _model(tie)
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=wd))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = set()
    for name, p in model.named_parameters():
        if torch.equal(p, before[name]):
            continue
        torch.testing.assert_close(p, before[name] * (1 - lr * wd), rtol=1e-6, atol=0)
        decayed.add(name)
    kinds = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2")
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2) for m in kinds}
    assert decayed == matrices | ({"head.weight"} if not tie else set())
    # every bias, norm gain and embedding table was looked at and left alone
    untouched = set(before) - decayed
    assert {"tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias"} <= untouched
    assert all(n.endswith("bias") or "norm" in n or "emb" in n for n in untouched)


def test_groups_carry_lr_multipliers_and_never_split_a_parameter():
    model = _model(tie=True)
    mult = lambda name, p: 0.5 if name.startswith("blocks.") and p.ndim == 2 else 1.0
    opt = build_optimizer(model, TrainConfig(lr=0.2, weight_decay=0.1), mult)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    names = {n: p for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for name in group["names"]:
            p = names[name]
            assert group["lr_mult"] == mult(name, p)
            assert group["lr"] == pytest.approx(0.2 * mult(name, p))
    assert math.isclose(
        sum(g["lr_mult"] * len(g["params"]) for g in opt.param_groups),
        sum(mult(n, p) for n, p in names.items()),
    )
