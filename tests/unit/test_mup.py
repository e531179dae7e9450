"""μP rules as data (kiln.models.mup), LR multipliers, and the coordinate check."""

import math

import pytest
import torch

from kiln.config import TrainConfig
from kiln.errors import ConfigError
from kiln.experiments.coord_check import coord_check
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.mup import apply_mup, lr_multiplier
from kiln.train.optim import build_optimizer


def shape(d_model=512, n_layers=2, tie=True) -> GPTConfig:
    return GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=4, n_kv_heads=4,
                     d_head=d_model // 4, d_ffn=4 * d_model, vocab_size=300, max_seq_len=32,
                     tie_embeddings=tie)  # fmt: skip


def test_apply_mup_sets_the_cerebras_rules():
    base = shape(512)
    mup = apply_mup(base, base_width=256)  # m = 2
    assert mup.width_mult == 2.0
    assert mup.embedding_multiplier == 10.0
    assert mup.output_multiplier == 0.5
    assert mup.attn_scale == 1.0 / 128  # 1/d_head, not 1/sqrt(d_head)
    assert mup.init_std == pytest.approx(0.08 / math.sqrt(2))
    assert mup.embed_init_std == 0.08
    # only the μP fields change; the shape does not, and the input is not mutated
    assert (mup.d_model, mup.n_layers, mup.d_ffn) == (512, 2, 2048)
    assert base.init_std == 0.02 and base.output_multiplier == 1.0


def test_apply_mup_at_the_base_width_keeps_output_and_init_scale():
    mup = apply_mup(shape(256), base_width=256)
    assert mup.output_multiplier == 1.0 and mup.init_std == 0.08


def test_apply_mup_rejects_a_bad_base_width():
    with pytest.raises(ConfigError, match="mup_base_width"):
        apply_mup(shape(), base_width=0)


def test_mup_init_stds_reach_the_model():
    torch.manual_seed(0)
    cfg = apply_mup(shape(1024, n_layers=2), base_width=256)  # m = 4: hidden std 0.04
    model = GPT(cfg)
    assert model.blocks["0"].mlp.w1.weight.std().item() == pytest.approx(0.04, rel=0.02)
    out = 0.04 / math.sqrt(2 * 2)  # output projections further ÷ sqrt(2L)
    assert model.blocks["1"].attn.wo.weight.std().item() == pytest.approx(out, rel=0.02)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.08, rel=0.02)


def test_lr_multiplier_divides_hidden_matrices_only():
    cfg = apply_mup(shape(128, tie=False), base_width=32)  # m = 4
    model = GPT(cfg)
    mult = lr_multiplier(cfg)
    got = {name: mult(name, p) for name, p in model.named_parameters()}
    assert got["blocks.0.attn.wq.weight"] == 0.25
    assert got["blocks.1.mlp.w2.weight"] == 0.25
    for name in ("tok_emb.weight", "pos_emb.weight", "head.weight", "blocks.0.attn.wq.bias",
                 "blocks.0.attn_norm.weight", "norm.weight"):  # fmt: skip
        assert got[name] == 1.0, name
    groups = build_optimizer(model, TrainConfig(lr=1e-2), mult).param_groups
    hidden = [g for g in groups if "blocks.0.attn.wq.weight" in g["names"]][0]
    assert hidden["lr"] == pytest.approx(2.5e-3)


def test_coord_check_is_flat_under_mup_and_grows_under_sp():
    r = coord_check([64, 128, 256], steps=2, batch=2, seq_len=32, vocab=256)
    mup, sp = r["slopes"]["mup"], r["slopes"]["sp"]
    assert max(abs(v) for v in mup.values()) < 0.25, mup
    assert sp["attention"] > 0.5 and sp["mlp"] > 0.5, sp


def test_lr_sweep_summary_reports_the_best_lr_shift_in_grid_steps():
    from kiln.experiments.lr_sweep import summarise

    lrs = [2.0**k for k in range(-8, -3)]
    best = {("sp", 8): 2**-5, ("sp", 128): 2**-8, ("mup", 8): 2**-5, ("mup", 128): 2**-4}
    runs = [{"param": p, "width": w, "lr": lr, "val_loss": 5 + abs(math.log2(lr / best[p, w]))}
            for (p, w) in best for lr in lrs]  # fmt: skip
    out = summarise(runs, [8, 128], {"sp": lrs, "mup": lrs})
    assert out["shift_grid_steps"] == {"sp": {8: 0, 128: -3}, "mup": {8: 0, 128: 1}}
