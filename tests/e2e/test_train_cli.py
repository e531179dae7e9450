"""`kiln train` and `kiln generate` end to end on a tiny model."""

import json

from tests.e2e.helpers import kiln, tiny_flags


def test_train_writes_run_and_loss_falls(tmp_path, corpus, kiln_env):
    run = tmp_path / "run"
    result = kiln(["train", *tiny_flags(run, corpus, steps=40)], kiln_env)
    assert result.returncode == 0, result.stderr
    assert "plan:" in result.stdout and "parameters" in result.stdout
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "plots/loss.png",
        "tokenizer.json",
    ):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir()), "no TensorBoard events"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000020", "step-0000030", "step-0000040"]  # keep=3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in records[0], key
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all("val_loss" in r for r in records if r["step"] % 10 == 0)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("params", "tokens", "flops", "final_train_loss", "final_val_loss", "wall_s"):
        assert key in summary, key
    assert summary["tokens"] == 40 * 8 * 32
    assert records[-1]["loss"] < records[0]["loss"] - 1.0

    gen = kiln(["generate", str(run), "--prompt", "The quick", "--max-new-tokens", "20"], kiln_env)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The quick")


def test_resume_continues_metrics_without_gaps(tmp_path, corpus, kiln_env):
    run = tmp_path / "run"
    assert kiln(["train", *tiny_flags(run, corpus, steps=20)], kiln_env).returncode == 0
    result = kiln(["train", "--run.dir", str(run), "--resume", "--train.max_steps", "30"], kiln_env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_default_precision_is_measured_and_config_keeps_auto(tmp_path, corpus, kiln_env):
    """Without --train.precision the run measures bf16 vs fp32 matmuls on this machine, says
    which it chose and why, trains, and config.yaml keeps 'auto' (so a re-run of the same
    command, --resume auto included, is the same run)."""
    import yaml

    run = tmp_path / "run"
    flags = tiny_flags(run, corpus, steps=4)
    i = flags.index("--train.precision")
    del flags[i : i + 2]
    result = kiln(["train", *flags], kiln_env)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("precision: "))
    assert line.split()[1] in ("bf16", "fp32") and "GFLOP/s measured on this CPU" in line
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "auto"
    again = kiln(["train", *flags, "--resume", "auto", "--train.max_steps", "6"], kiln_env)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
