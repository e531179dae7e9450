"""Under torchrun (2 processes, gloo) a re-submitted job repeats its whole command line: the
first start with --resume auto begins a new run, the same command plus --resume continues it."""

from kiln.train.checkpoint import read_meta
from tests.distributed.test_resume_reshard import _torchrun
from tests.e2e.helpers import tiny_flags


def test_torchrun_same_command_with_resume(tmp_path, corpus, kiln_env):
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    flags = [*tiny_flags(run, corpus, steps=4), "--checkpoint.every", "2", "--train.eval_every",
             "0", "--log.tensorboard", "false", "--parallel.timeout_s", "120"]  # fmt: skip
    first = _torchrun(2, ["train", *flags, "--resume", "auto"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "holds no run yet" in first.stdout
    again = _torchrun(2, ["train", *flags, "--train.max_steps", "6", "--resume"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step-0000004 (step 4" in again.stdout
    assert read_meta(run / "checkpoints/step-0000006")["world_size"] == 2
