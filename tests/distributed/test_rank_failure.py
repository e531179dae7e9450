"""A rank killed mid-run ends the job: the survivors exit non-zero, with one readable sentence,
well within parallel.timeout_s — no hang. Ranks are plain processes (no torchrun agent, which
would kill the survivors itself and hide a hang)."""

import subprocess
import sys
import time

from tests.distributed.conftest import free_port
from tests.e2e.helpers import tiny_flags

TIMEOUT_S = 60


def test_killed_rank_ends_the_job(tmp_path, corpus, kiln_env):
    args = [*tiny_flags(tmp_path / "run", corpus, steps=20), "--parallel.timeout_s",
            str(TIMEOUT_S), "--log.tensorboard", "false"]  # fmt: skip
    env = dict(kiln_env, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["KILN_TEST_CRASH_AT"] = "step:3@1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "train", *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    killed_at = None
    try:
        assert procs[1].wait(timeout=240) == -9
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - killed_at < TIMEOUT_S
    assert procs[0].returncode == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert "rank 0 of 2 lost contact with the other ranks" in lines[0] and "--resume" in lines[0]
