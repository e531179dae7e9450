"""μP through the commands: `kiln train --model.parametrization mup` initialises and steps with
the μP rules, and tiny runs of `kiln mup coord-check` and `kiln scale --lr-sweep` write their
results."""

import json

import pytest
import torch

from kiln.cli import main
from kiln.models.gpt import GPTConfig
from kiln.train.checkpoint import read_meta, read_tensors
from kiln.train.run import build_model
from tests.e2e.helpers import kiln, tiny_flags

LR = 1e-3


def test_train_uses_mup_init_and_lr_multipliers(tmp_path, corpus, kiln_env):
    """d_model 64 with base width 256: m = 1/4, so hidden matrices start at std 0.08/√m = 0.16
    (output projections ÷ √(2L) = 0.08), embeddings at 0.08, and take Adam steps of LR/m = 4·LR
    while embeddings take LR. One Adam step moves every entry by ≈ its LR (g/|g|), so the
    largest change of each tensor is its LR."""
    run = tmp_path / "run"
    flags = [*tiny_flags(run, corpus, steps=1), "--model.d_model", "64", "--model.d_ffn", "128",
             "--model.parametrization", "mup", "--model.mup_base_width", "256",
             "--train.lr", str(LR), "--train.warmup_steps", "0", "--train.weight_decay", "0",
             "--train.grad_clip", "0", "--log.tensorboard", "false"]  # fmt: skip
    result = kiln(["train", *flags], kiln_env)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints/step-0000001"
    after = {k.removeprefix("model."): v for k, v in read_tensors(ckpt).items()
             if k.startswith("model.")}  # fmt: skip
    initial = build_model(GPTConfig(**read_meta(ckpt)["model_shape"]), torch.device("cpu"), 0)
    assert initial.config.width_mult == 0.25
    start = dict(initial.named_parameters())

    for name in ("blocks.0.attn.wq.weight", "blocks.1.mlp.w1.weight"):
        assert after[name].std().item() == pytest.approx(0.16, rel=0.05), name
    assert after["blocks.0.attn.wo.weight"].std().item() == pytest.approx(0.08, rel=0.05)
    assert after["tok_emb.weight"].std().item() == pytest.approx(0.08, rel=0.05)

    def step_size(name):
        return (after[name] - start[name].detach()).abs().max().item()

    for name in ("blocks.0.attn.wq.weight", "blocks.0.mlp.w2.weight", "blocks.1.attn.wo.weight"):
        assert step_size(name) == pytest.approx(4 * LR, rel=0.01), name
    for name in ("tok_emb.weight", "pos_emb.weight", "blocks.0.attn.wq.bias", "norm.weight"):
        assert step_size(name) == pytest.approx(LR, rel=0.01), name


def test_mup_coord_check_command(tmp_path, cache_env, capsys):
    out = tmp_path / "coord.png"
    assert main(["mup", "coord-check", "--widths", "32,64", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and result["widths"] == [32, 64] and result["steps"] == 1
    for param in ("sp", "mup"):
        assert set(result["slopes"][param]) == {"embedding", "attention", "mlp", "logits"}
        assert all(len(v) == 2 and min(v) > 0 for k, v in result[param].items())
    assert "mup: slope of log2 mean|x| vs log2 width" in capsys.readouterr().out


def test_scale_lr_sweep_command_with_tiny_sizes(tmp_path, corpus, cache_env, capsys):
    argv = ["scale", "--lr-sweep", "--run.dir", str(tmp_path), "--corpus", str(corpus),
            "--vocab-size", "300", "--widths", "8,16", "--max-steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--n-layers", "1"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert (tmp_path / "lr-transfer.png").is_file()
    assert result["widths"] == [8, 16]  # the given sizes, not the sweep's defaults
    assert {(r["steps"], r["seq_len"], r["n_layers"]) for r in result["runs"]} == {(2, 16, 1)}
    for param in ("sp", "mup"):
        runs = [r for r in result["runs"] if r["param"] == param]
        assert len(runs) == 2 * len(result["lrs"][param])
        assert set(result["best_lr"][param]) == {"8", "16"}  # JSON keys
    assert "best LR by width" in capsys.readouterr().out
