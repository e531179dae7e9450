"""kiln plan, kiln scale (tiny family: resume, fit, predict), and their bad inputs."""

import json

import pytest

from kiln.models.gpt import GPTConfig
from tests.e2e.helpers import kiln


def assert_user_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_plan_json_has_the_documented_fields(kiln_env):
    proc = kiln(["plan", "--flops", "1e20", "--json"], kiln_env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    for key in ("params", "non_embedding_params", "tokens", "flops", "steps", "batch_size",
                "lr", "shape"):  # fmt: skip
        assert key in plan
    assert plan["tokens"] == pytest.approx(20 * plan["params"])
    text = kiln(["plan", "--preset", "cerebras-gpt-111m", "--device", "a100", "--count", "8"],
                kiln_env)  # fmt: skip
    assert text.returncode == 0 and "params" in text.stdout and "time" in text.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "--flops", "-1"], ["flops", "-1"]),
        (["plan", "--params", "1e8", "--tokens-per-param", "0"], ["--tokens-per-param"]),
        (["plan", "--flops", "1e20", "--preset", "cerebras-gpt-111m"], ["exactly one"]),
        (["scale", "--predict", "-5", "--fit", "cerebras-gpt-pile"], ["--predict"]),
        (["scale", "--widths", "16,24"], ["at least 5"]),
    ],
)
def test_bad_inputs_exit_2_with_one_sentence(kiln_env, args, words):
    assert_user_error(kiln(args, kiln_env), *words)


def test_predict(kiln_env, tmp_path):
    proc = kiln(["scale", "--predict", "1e21", "--fit", "cerebras-gpt-pile", "--json"], kiln_env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["flops"] == 1e21 and 1.0 < out["loss"] < 3.0
    bad = tmp_path / "fit.json"
    bad.write_text("{not json")
    assert_user_error(kiln(["scale", "--predict", "1e21", "--fit", str(bad)], kiln_env), "JSON")
    assert_user_error(kiln(["scale", "--predict", "1e21", "--fit", "nope"], kiln_env), "nope")


def test_train_length_from_a_flop_budget_or_a_ratio():
    """kiln train's --train.flops / --train.tokens_per_param (used when max_steps is unset)."""
    import math
    from types import SimpleNamespace

    import torch

    from kiln.config import JobConfig, TrainConfig
    from kiln.planning.flops import flops_per_token
    from kiln.train.plan import make_training_plan

    shape = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=128,
                      vocab_size=300, max_seq_len=64)  # fmt: skip
    dims = SimpleNamespace(dp_size=1, world_size=1, device=torch.device("cpu"))
    per_step = 8 * 256 * flops_per_token(shape, 256)
    job = JobConfig(train=TrainConfig(batch_size=8, flops=1e10))
    plan = make_training_plan(shape, job, dims)
    assert plan.steps == math.ceil(1e10 / per_step) and plan.flops >= 1e10
    assert plan.length_from.startswith("train.flops")
    job = JobConfig(train=TrainConfig(batch_size=8, tokens_per_param=5.0))
    plan = make_training_plan(shape, job, dims)
    assert plan.steps == math.ceil(5.0 * shape.num_params() / (8 * 256))


def test_scale_sweep_resumes_then_fits(kiln_env, corpus, tmp_path):
    root = tmp_path / "sweep"
    args = ["scale", "--run.dir", str(root), "--corpus", str(corpus), "--vocab-size", "300",
            "--seq-len", "32", "--widths", "8,12,16,20,24", "--n-heads", "2",
            "--batch-size", "4", "--max-steps", "6", "--eval-batches", "2",
            "--checkpoint-every", "3", "--bootstrap", "20", "--precision", "fp32"]  # fmt: skip
    first = kiln([*args, "--stop-after", "2"], kiln_env)
    assert first.returncode == 0, first.stderr
    assert "stopped after 2" in first.stdout
    member1 = root / "member-01-d12-L2"
    assert (member1 / "summary.json").is_file() and not (root / "fit.json").exists()
    (member1 / "summary.json").unlink()  # as if killed after its last checkpoint
    second = kiln(args, kiln_env)
    assert second.returncode == 0, second.stderr
    assert "member-00-d8-L2: finished earlier, skipped" in second.stdout
    assert "member-01-d12-L2: resuming" in second.stdout
    assert "member-04-d24-L2: N =" in second.stdout
    fit = json.loads((root / "fit.json").read_text())
    assert fit["holdout"]["name"] == "member-04-d24-L2" and fit["n_points"] == 4
    for key in ("alpha", "c0", "l_inf", "ci"):
        assert key in fit
    assert (root / "scaling.png").is_file()
    pred = kiln(["scale", "--predict", "1e12", "--fit", str(root / "fit.json"), "--json"],
                kiln_env)  # fmt: skip
    assert pred.returncode == 0 and json.loads(pred.stdout)["loss"] > 0
    changed = kiln([*args, "--lr", "0.5"], kiln_env)
    assert_user_error(changed, "different lr")


def test_fit_family_recovers_a_synthetic_law_and_fits_chinchilla_when_d_varies():
    from kiln.experiments.scale import ScaleSettings, fit_family

    s = ScaleSettings(widths=[16, 24, 32, 48, 64], tokens_per_param=[20.0, 5.0])
    rows = []
    for r in (20.0, 5.0):
        for w in s.widths:
            n = 24 * w * w
            d = r * n
            loss = 2.0 + 400 / n**0.5 + 300 / d**0.4
            rows.append({"name": f"d{w}-r{r:g}", "width": w, "tokens_per_param": r,
                         "params": n, "non_embedding_params": n, "tokens": d,
                         "flops": 6.0 * n * d, "steps": 1, "final_val_loss": loss,
                         "wall_s": 0.0})  # fmt: skip
    out = fit_family(rows, s, n_bootstrap=20)
    assert out["holdout"]["name"] == "d64-r20" and abs(out["holdout"]["error"]) < 0.02
    ch = out["chinchilla"]
    assert ch is not None and abs(ch["e"] - 2.0) < 0.3
    assert abs(ch["holdout_predicted"] / out["holdout"]["loss"] - 1) < 0.01
