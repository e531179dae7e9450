"""Resuming with the same command line (--resume, --resume auto, --resume CHECKPOINT) and the
faults of a machine: a full disk while a checkpoint is written, a tampered, truncated or corrupt
checkpoint, an unwritable run directory. Each fault ends in one sentence on stderr (no
traceback), a documented exit code, and every complete checkpoint still loadable.
"""

import os
import pickle
import shutil

import pytest

from kiln.cli import main
from kiln.train.checkpoint import read_tensors
from tests.e2e.helpers import kiln, tiny_flags
from tests.e2e.test_cli_errors import _snapshot


def _flags(run, corpus, steps=4):
    return [*tiny_flags(run, corpus, steps=steps), "--checkpoint.every", "2", "--train.seed", "7",
            "--train.eval_every", "0", "--log.tensorboard", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus, kiln_env):
    """A finished 4-step run with checkpoints at steps 2 and 4, started with --resume auto."""
    root = tmp_path_factory.mktemp("resume")
    env = kiln_env  # the session's token cache, outside the snapshots of ``root``
    result = kiln(["train", *_flags(root / "run", corpus), "--resume", "auto"], env)
    assert result.returncode == 0, result.stderr
    assert "holds no run yet, so a new run starts" in result.stdout
    return root, corpus, env


def _copy(base, name):
    root = base[0]
    shutil.copytree(root / "run", root / name)
    return root / name


def _one_sentence(code, err, want_code, needles):
    lines = err.strip().splitlines()
    assert code == want_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _refused(root, argv, capsys, needles):
    before = _snapshot(root)
    _one_sentence(main(argv), capsys.readouterr().err, 2, needles)
    assert _snapshot(root) == before


def test_same_command_with_resume_auto_continues_its_own_run(base):
    """The command that started ``base`` (--resume auto included), extended to 6 steps."""
    root, corpus, env = base
    run = _copy(base, "same")
    result = kiln(["train", *_flags(run, corpus, steps=6), "--resume", "auto"], env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-0000004 (step 4" in result.stdout
    assert "done: 6 steps" in result.stdout


REFUSALS = {
    "changed flag, bare --resume": (
        ["--resume", "--checkpoint.every", "3"],
        ["--checkpoint.every 3 cannot be given", "checkpoint.every is 2"],
    ),
    "auto on a different run": (
        ["--resume", "auto", "--train.lr", "0.5"],
        ["--resume auto", "holds a different run", "train.lr is 0.01 there and 0.5"],
    ),
    "auto on a different run, changed by a default": (
        ["--resume", "auto", "--train.seed", "0"],
        ["holds a different run", "train.seed is 7 there and 0"],
    ),
    "unknown checkpoint": (
        ["--resume", "step-0000003"],
        ["--resume step-0000003 is not a complete checkpoint", "step-0000002, step-0000004"],
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_resume_refusals(base, case, capsys, monkeypatch):
    root, corpus, env = base
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    extra, needles = REFUSALS[case]
    flags = _flags(root / "run", corpus)
    if "default" in case:  # the command leaves --train.seed at its default
        del flags[flags.index("--train.seed") : flags.index("--train.seed") + 2]
    _refused(root, ["train", *flags, *extra], capsys, needles)


def test_same_values_from_a_yaml_file_are_accepted(base, capsys, monkeypatch):
    root, _, env = base
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    good, bad = root / "same.yaml", root / "changed.yaml"
    good.write_text("checkpoint:\n  every: 2\ntrain:\n  lr: 1.0e-2\n")
    bad.write_text("checkpoint:\n  every: 5\n")
    _refused(root, ["train", "--run.dir", str(root / "run"), "--config", str(bad), "--resume"],
             capsys, ["--checkpoint.every 5 cannot be given"])  # fmt: skip
    from kiln.cli import parse_job
    from kiln.train.run_dir import config_conflicts, load_run_config

    job, resume, given, _ = parse_job(["--config", str(good), "--resume"])
    assert resume == "latest" and {"checkpoint.every", "train.lr"} <= given
    assert config_conflicts(load_run_config(root / "run"), job, given) == []


def test_disk_full_while_writing_a_checkpoint(base):
    """An injected ENOSPC in the write of step 4 (free space reported as 1.5 MiB: room for
    one checkpoint, not for keep + 1 = 4): exit 3, one sentence, no partial left, step 2
    intact; the same command plus --resume then finishes the run."""
    root, corpus, env = base
    run = root / "full"
    fault = dict(env, KILN_TEST_FAULT="enospc:save:4", KILN_TEST_DISK_FREE=str(3 * 2**19))
    result = kiln(["train", *_flags(run, corpus)], fault)
    assert "cannot hold checkpoint.keep + 1 = 4 checkpoints" in result.stdout
    _one_sentence(result.returncode, result.stderr, 3, [
        "checkpoint step 4 could not be written: no space left on the device holding",
        "1.5 MiB are free", "step-0000002 is intact", "partial write was removed"])  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert read_tensors(run / "checkpoints/step-0000002")
    result = kiln(["train", *_flags(run, corpus), "--resume"], env)
    assert result.returncode == 0, result.stderr
    assert "step-0000002 (step 2" in result.stdout and "done: 4 steps" in result.stdout


def test_no_room_for_one_checkpoint_is_refused_at_start(base, capsys, monkeypatch):
    root, corpus, env = base
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    monkeypatch.setenv("KILN_TEST_DISK_FREE", "1000")
    code = main(["train", *_flags(root / "tiny-disk", corpus)])
    _one_sentence(code, capsys.readouterr().err, 3, ["has no room for a checkpoint"])
    assert not (root / "tiny-disk" / "config.yaml").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _tamper(step):
    (step / ".metadata").write_bytes(pickle.dumps(_Evil()))


def _truncate(step):
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])


def _corrupt_json(step):
    (step / "kiln.json").write_text('{"step": 4, "model_')


DAMAGE = {
    "tampered .metadata": (_tamper, ".metadata was refused: unpickling it would call posix.system"),
    "truncated shard": (_truncate, "shard __0_0.distcp is truncated"),
    "corrupt kiln.json": (_corrupt_json, "kiln.json does not parse"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_newest_checkpoint(base, case, capsys, monkeypatch):
    root, corpus, env = base
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    monkeypatch.chdir(root)
    damage, needle = DAMAGE[case]
    run = root / f"damaged-{case.split()[1]}"
    if not run.exists():
        _copy(base, run.name)
        damage(run / "checkpoints/step-0000004")
    way_on = "older checkpoint step-0000002 is intact — continue from it with 'kiln train --resume"
    for argv in (["generate", str(run)], ["train", *_flags(run, corpus), "--resume"]):
        _refused(root, argv, capsys, [f"{run}/checkpoints/step-0000004 is damaged", needle, way_on])
    assert not (root / "PWNED").exists()
    assert read_tensors(run / "checkpoints/step-0000002")


def test_resume_from_an_older_checkpoint_after_damage(base):
    """The real process: no library's traceback reaches stderr, and the flag the sentence
    names continues the run."""
    root, corpus, env = base
    run = _copy(base, "tampered-real")
    _tamper(run / "checkpoints/step-0000004")
    result = kiln(["generate", str(run), "--max-new-tokens", "2"], env)
    _one_sentence(result.returncode, result.stderr, 2, ["is damaged: .metadata was refused"])
    result = kiln(["train", "--run.dir", str(run), "--resume", "step-0000002"], env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-0000002 (step 2" in result.stdout
    assert read_tensors(run / "checkpoints/step-0000004")  # rewritten by the resumed run


@pytest.mark.parametrize("where", ["{root}/a-file/run", "/proc/kiln-run"])
def test_unwritable_run_dir(base, where, capsys, monkeypatch):
    root, corpus, _ = base
    (root / "a-file").write_text("not a directory\n")
    cache = root / "untouched-cache"
    monkeypatch.setenv("KILN_CACHE", str(cache))
    run = where.format(root=root)
    _refused(root, ["train", *_flags(run, corpus)], capsys, [f"run.dir {run} cannot be written"])
    assert not cache.exists()  # refused before any data or tokenizer work


def test_checkpoint_size_estimate_is_close_to_the_real_one(base):
    from kiln.models.gpt import GPTConfig
    from kiln.train.checkpoint import read_meta
    from kiln.train.run import checkpoint_bytes

    step = base[0] / "run/checkpoints/step-0000004"
    real = sum(f.stat().st_size for f in step.iterdir())
    estimate = checkpoint_bytes(GPTConfig(**read_meta(step)["model_shape"]))
    assert 0.9 < estimate / real < 1.25, (estimate, real)
