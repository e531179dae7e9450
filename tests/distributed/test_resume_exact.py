"""A run SIGKILLed at any point and resumed ends bitwise equal to one never interrupted.

One run is killed three times — before its first checkpoint, between checkpoints, and inside a
checkpoint write (after DCP and kiln.json are on disk, before the rename) — and resumed after
each kill. Its final checkpoint must hold exactly the tensors (model, AdamW moments, RNG) of an
uninterrupted run, and its metrics.jsonl exactly the same steps and losses. The same holds under
tensor and pipeline parallel together (TP2 × PP2 on four processes).
"""

import json
import signal

import pytest
import torch

from kiln.train.checkpoint import read_meta, read_tensors
from tests.distributed.conftest import torchrun
from tests.e2e.helpers import kiln, tiny_flags

STEPS = 12


def _flags(run, corpus):
    return [
        *tiny_flags(run, corpus, steps=STEPS),
        "--checkpoint.every", "4", "--log.every", "1", "--train.eval_every", "0",
        "--log.tensorboard", "false",
    ]  # fmt: skip


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_bitwise_equal_runs(ref, run):
    """The same steps and losses, the same final tensors (model, AdamW moments, RNG) and the
    same loader position; returns the two final checkpoints."""
    want, got = _records(ref), _records(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    final_ref, final_run = ref / "checkpoints/step-0000012", run / "checkpoints/step-0000012"
    a, b = read_tensors(final_ref), read_tensors(final_run)
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert read_meta(final_ref)["loader"] == read_meta(final_run)["loader"]
    return final_ref, final_run


def _crash(args, env, point):
    result = kiln(args, dict(env, KILN_TEST_CRASH_AT=point))
    assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr)


def test_sigkill_anywhere_then_resume_is_bitwise_exact(tmp_path, corpus, kiln_env):
    ref, run = tmp_path / "ref", tmp_path / "run"
    result = kiln(["train", *_flags(ref, corpus)], kiln_env)
    assert result.returncode == 0, result.stderr

    resume = ["train", "--run.dir", str(run), "--resume"]
    _crash(["train", *_flags(run, corpus)], kiln_env, "step:2")  # before the first checkpoint
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    _crash(resume, kiln_env, "step:6")  # between the checkpoints of steps 4 and 8
    _crash(resume, kiln_env, "save:8")  # inside the write of step 8
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step-0000008" / "kiln.json").is_file()
    assert not (ckpts / "step-0000008").exists()
    result = kiln(resume, kiln_env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-0000004" in result.stdout
    assert "removed .tmp-step-0000008" in result.stdout
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]

    final_ref, final_run = _assert_bitwise_equal_runs(ref, run)
    assert read_meta(final_ref)["trainer"] == read_meta(final_run)["trainer"]


# Tensor and pipeline parallel in one layout (4 processes): one test instead of a TP2 and a PP2
# one keeps the suite in its time budget, and covers the TP and the PP state together.
LAYOUT = ["--parallel.tensor", "2", "--parallel.pipeline", "2", "--model.tie_embeddings", "false"]


@pytest.mark.timeout(900)  # three torchrun launches
def test_sigkill_then_resume_is_bitwise_exact_under_tp2_pp2(tmp_path, corpus, kiln_env):
    """All ranks of a TP2 × PP2 run SIGKILLed between checkpoints, resumed with the same
    command plus --resume under the same layout: the same losses and the same final tensors
    (model shards, AdamW moments, RNG) as an uninterrupted run of that layout, which itself
    started as a re-submitted job does, with --resume auto in an empty run directory."""
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    flags = lambda run: ["train", *_flags(run, corpus), *LAYOUT]  # noqa: E731
    ref, run = tmp_path / "ref", tmp_path / "run"
    result = torchrun(4, [*flags(ref), "--resume", "auto"], env)  # a re-submitted job's command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "holds no run yet" in result.stdout  # --resume auto: the first start is a new run
    result = torchrun(4, flags(run), dict(env, KILN_TEST_CRASH_AT="step:6"))
    assert result.returncode != 0 and not (run / "checkpoints/step-0000008").exists()
    result = torchrun(4, [*flags(run), "--resume"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step-0000004" in result.stdout

    _assert_bitwise_equal_runs(ref, run)
