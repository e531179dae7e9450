"""DDP through the command line: `torchrun --nproc_per_node 2 -m kiln.cli train --parallel.data
ddp` (gloo, 2 processes, each half of the global batch) trains with the losses of the one-process
run with the same global batch, within 1e-5 in fp32 over 12 steps, and its loss falls."""

import json

import numpy as np
import pytest

from kiln.cli import main
from kiln.train.checkpoint import read_meta
from tests.distributed.test_resume_reshard import _torchrun
from tests.e2e.helpers import tiny_flags

STEPS = 12


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)  # a run and a torchrun of 2 processes
def test_ddp_under_torchrun_matches_one_process(tmp_path, corpus, kiln_env, cache_env, capsys):
    flags = lambda run: [*tiny_flags(run, corpus, steps=STEPS), "--log.every", "1",
                         "--train.eval_every", "0", "--train.eval_batches", "1",
                         "--checkpoint.every", "0", "--log.tensorboard", "false"]  # fmt: skip
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert main(["train", *flags(one)]) == 0
    assert "1 data-parallel rank(s) × micro-batch 8" in capsys.readouterr().out
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    args = ["train", *flags(ddp), "--parallel.data", "ddp", "--parallel.timeout_s", "120"]
    result = _torchrun(2, args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP over 2 data-parallel ranks" in result.stdout
    assert "2 data-parallel rank(s) × micro-batch 4" in result.stdout
    assert read_meta(ddp / f"checkpoints/step-{STEPS:07d}")["world_size"] == 2
    want, got = _losses(one), _losses(ddp)
    assert len(got) == STEPS and got[-1] < got[0] - 0.5, got
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
