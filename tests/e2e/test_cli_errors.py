"""Bad input: exit code 2, one sentence on stderr, nothing on disk changed."""

import hashlib

import pytest

from tests.e2e.helpers import kiln, tiny_flags


def _snapshot(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--train.max_stepz", "5"], "did you mean '--train.max_steps'"),
        (["--train.max_steps", "abc"], "must be int"),
        (["--train.batch_size", "0"], "train.batch_size is 0"),
        (["--model.n_heads", "3"], "does not divide"),
        (["--data.corpus", "/nonexistent/corpus"], "does not exist"),
        (["--model.preset", "cerebras-gpt-111"], "did you mean"),
        (["--data.seq_len", "128"], "exceeds the model's context"),
    ],
)
def test_bad_flags_exit_2(tmp_path, corpus, kiln_env, args, needle):
    result = kiln(["train", *tiny_flags(tmp_path / "run", corpus), *args], kiln_env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


def test_bad_yaml_and_existing_run_are_refused(tmp_path, corpus, kiln_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    result = kiln(["train", "--config", str(bad)], kiln_env)
    assert result.returncode == 2 and "does not parse as YAML" in result.stderr

    run = tmp_path / "run"
    assert kiln(["train", *tiny_flags(run, corpus, steps=10)], kiln_env).returncode == 0
    before = _snapshot(run)
    again = kiln(["train", *tiny_flags(run, corpus, steps=12)], kiln_env)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert _snapshot(run) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    result = kiln(["train", "--run.dir", str(empty), "--resume"], kiln_env)
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
