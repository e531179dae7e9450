"""A checkpoint saved under one layout resumes under another (model, AdamW state and data
position included): an untied tiny GPT trains 10 steps as PP2 (2 processes, 1F1B), then resumes
to step 20 with the same command line plus --resume under TP2 (2 processes) and as one
process. Every run's losses follow the uninterrupted single-process run (AdamW, so within 1e-3
as the FSDP/DDP reshard test), and the run's directory holds the layout each checkpoint was
saved with."""

import json
import shutil
import subprocess
import sys

import numpy as np

from kiln.train.checkpoint import read_meta
from tests.e2e.helpers import kiln, tiny_flags


def _torchrun(n: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "kiln.cli", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pp2_checkpoint_resumes_under_tp2_and_one_process(tmp_path, corpus, kiln_env):
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    common = ["--model.tie_embeddings", "false", "--log.every", "1", "--train.eval_every", "0",
              "--train.min_lr_ratio", "1.0", "--train.warmup_steps", "2",  # LR: same at any length
              "--log.tensorboard", "false"]  # fmt: skip
    one = tmp_path / "one"
    result = kiln(["train", *tiny_flags(one, corpus, steps=20), *common], env)
    assert result.returncode == 0, result.stderr[-3000:]

    pp = tmp_path / "pp2"
    pp_flags = ["--parallel.pipeline", "2", "--parallel.pipeline_schedule", "1F1B"]
    result = _torchrun(2, ["train", *tiny_flags(pp, corpus, steps=10), *common, *pp_flags], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline parallel: 2 ranks" in result.stdout
    assert read_meta(pp / "checkpoints/step-0000010")["layout"]["pp"] == 2
    np.testing.assert_allclose(_losses(pp), _losses(one)[:10], rtol=0, atol=1e-4)

    for name, n, layout in [("tp2", 2, ["--parallel.tensor", "2"]), ("single", 1, [])]:
        run = tmp_path / name
        shutil.copytree(pp, run)
        args = ["train", *tiny_flags(run, corpus, steps=20), *common, *layout, "--resume"]
        result = kiln(args, env) if n == 1 else _torchrun(n, args, env)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert "resumed from" in result.stdout, name
        np.testing.assert_allclose(_losses(run), _losses(one), rtol=0, atol=1e-3, err_msg=name)
        layout_saved = read_meta(run / "checkpoints/step-0000020")["layout"]
        assert layout_saved["tp"] == (2 if name == "tp2" else 1), name


def test_bad_layouts_get_one_sentence_and_exit_2(tmp_path, corpus, kiln_env):
    cases = [
        (["--parallel.tensor", "2"], "parallel.tensor 2 × parallel.pipeline 1 × "
         "parallel.data_replicate 1 = 2 does not divide the world size 1"),
        (["--parallel.pipeline_schedule", "Zigzag"], "parallel.pipeline_schedule"),
    ]  # fmt: skip
    for flags, sentence in cases:
        run = tmp_path / "bad"
        result = kiln(["train", *tiny_flags(run, corpus, steps=2), *flags], kiln_env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert sentence in result.stderr and "Traceback" not in result.stderr
        assert not (run / "config.yaml").exists()
