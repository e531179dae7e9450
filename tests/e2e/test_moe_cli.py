"""kiln train of the tiny MoE preset: active vs total parameters, MoE metrics, and a run killed
after step 3 that resumes to the same bits as an uninterrupted one (expert bias included)."""

import json

import torch

from kiln.train.checkpoint import read_tensors
from tests.e2e.helpers import kiln, tiny_flags

MOE = ["--model.preset", "tiny-moe", "--model.n_kv_heads", "1", "--moe.d_expert", "32",
       "--moe.bias_update_rate", "0.01", "--moe.z_loss_coef", "0.001",
       "--checkpoint.every", "3", "--log.every", "2", "--train.eval_every", "0",
       "--log.tensorboard", "false"]  # fmt: skip


def test_moe_train_metrics_and_bitwise_resume(tmp_path, corpus, kiln_env):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = kiln(["train", *tiny_flags(straight, corpus, steps=6), *MOE], kiln_env)
    assert result.returncode == 0, result.stderr
    assert "active per token" in result.stdout
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["active_params"] < summary["params"]
    record = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_max.0", "moe_load_mean.1",
                "moe_dropped.0"):  # fmt: skip
        assert key in record
    assert record["moe_load_max.0"] >= record["moe_load_mean.0"] > 0

    env = dict(kiln_env, KILN_TEST_CRASH_AT="step:4")
    assert kiln(["train", *tiny_flags(killed, corpus, steps=6), *MOE], env).returncode != 0
    resumed = kiln(["train", "--run.dir", str(killed), "--resume"], kiln_env)
    assert resumed.returncode == 0, resumed.stderr
    a = read_tensors(straight / "checkpoints" / "step-0000006")
    b = read_tensors(killed / "checkpoints" / "step-0000006")
    assert any("expert_bias" in k for k in a)
    assert torch.any(a["model.blocks.0.mlp.router.expert_bias"] != 0)
    for key, value in a.items():
        if key.startswith(("model.", "optim.")):
            assert torch.equal(value, b[key]), key
