"""`kiln train --resume --train.max_steps M` extends a finished run of N < M steps: the steps
after the resume take the learning rates of the longer schedule (same warm-up, peak and floor
as saved; the cosine now reaching its floor at M), read from metrics.jsonl."""

import json
import math

import pytest

from kiln.cli import main
from tests.e2e.helpers import tiny_flags

PEAK, FLOOR = 1e-2, 0.1  # tiny_flags' train.lr; the default train.min_lr_ratio


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return PEAK * (step + 1) / warmup
    p = (step - warmup) / (total - warmup)
    return PEAK * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * p)))


def test_resume_with_more_steps_follows_the_extended_schedule(tmp_path, corpus, cache_env):
    run = tmp_path / "run"
    flags = [*tiny_flags(run, corpus, steps=4), "--log.every", "1", "--train.eval_every", "0",
             "--train.eval_batches", "1", "--log.tensorboard", "false"]  # fmt: skip
    assert main(["train", *flags]) == 0
    assert main(["train", "--run.dir", str(run), "--resume", "--train.max_steps", "8"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    lrs = [r["lr"] for r in records]  # the line of step s logs the LR of schedule step s - 1
    # 4 planned steps: 1 warm-up step (max(5% of 4, 4/4) rounded), cosine to step 4
    assert lrs[:4] == pytest.approx([_cosine(s, 1, 4) for s in range(4)], rel=1e-12)
    assert lrs[:4] == pytest.approx([PEAK, PEAK, PEAK * 0.775, PEAK * 0.325], rel=1e-12)
    # extended to 8: still 1 warm-up step (as saved; a new 8-step plan would take 2), and the
    # cosine restarts its decay from where step 4 sits on the 8-step curve
    want = [_cosine(s, 1, 8) for s in range(4, 8)]
    assert lrs[4:] == pytest.approx(want, rel=1e-12)
    assert want[0] == pytest.approx(PEAK * (0.1 + 0.45 * (1 + math.cos(3 * math.pi / 7))))
