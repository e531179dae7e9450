"""Bad input: exit code 2, one sentence on stderr, nothing on disk changed.

Every case snapshots (sha256) every file under the test's root — the run directories and the
token cache included — before and after. Most cases call ``kiln.cli.main`` in-process (the
code path is the same; it saves a torch import per case); the YAML case runs the real
``kiln`` process to check the exit status end to end.
"""

import hashlib
import shutil

import pytest

from kiln.cli import main
from tests.e2e.helpers import kiln, tiny_flags


def _snapshot(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus, kiln_env):
    """A root holding a token cache and a finished 4-step run with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("errors")
    env = dict(kiln_env, KILN_CACHE=str(root / "cache"))
    run = root / "run"
    args = ["train", *tiny_flags(run, corpus, steps=4), "--checkpoint.every", "2",
            "--train.eval_every", "0", "--log.tensorboard", "false"]  # fmt: skip
    result = kiln(args, env)
    assert result.returncode == 0, result.stderr
    (root / "empty-corpus").mkdir()
    (root / "empty-corpus" / "blank.txt").write_text("  \n")
    (root / "empty-run").mkdir()
    (root / "bad.yaml").write_text("train: [unclosed\n")
    # A copy whose newest checkpoint lost a shard, and one whose config names another shape.
    for name in ("incomplete", "reshaped"):
        shutil.copytree(run, root / name)
    next((root / "incomplete/checkpoints/step-0000004").glob("*.distcp")).unlink()
    cfg = root / "reshaped" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("d_model: 32", "d_model: 48"))
    # A token cache whose train shard was truncated.
    shutil.copytree(root / "cache", root / "bad-cache")
    shard = next((root / "bad-cache").rglob("tokens-00000.bin"))
    shard.write_bytes(shard.read_bytes()[:-64])
    return root, corpus, env


CASES = {
    "unknown key": (["--train.max_stepz", "5"], "did you mean '--train.max_steps'"),
    "wrong type": (["--train.max_steps", "abc"], "must be int"),
    "zero size": (["--train.batch_size", "0"], "train.batch_size is 0"),
    "negative size": (["--model.d_model", "-32"], "model.d_model is -32"),
    "zero seq_len": (["--data.seq_len", "0"], "data.seq_len is 0"),
    "heads do not divide d_model": (["--model.n_heads", "3"], "does not divide"),
    "seq_len above context": (["--data.seq_len", "128"], "exceeds the model's context"),
    "batch vs micro-batch": (["--train.micro_batch_size", "3"], "must be divisible"),
    "unknown preset": (["--model.preset", "cerebras-gpt-111"], "did you mean"),
    "missing corpus": (["--data.corpus", "/nonexistent/corpus"], "does not exist"),
    "corpus without text": (["--data.corpus", "{root}/empty-corpus"], "holds no text"),
    "truncated shard": (["--data.cache_dir", "{root}/bad-cache"], "corrupt or truncated"),
    "run dir holds a run": (["--run.dir", "{root}/run"], "already holds a run"),
}
RESUME_CASES = {
    "resume without a run": ("empty-run", "no complete checkpoint"),
    "incomplete checkpoint": ("incomplete", "is damaged: shard __0_0.distcp is missing"),
    "checkpoint of another shape": ("reshaped", "different model shape"),
}


def _check(root, argv, needle, capsys):
    before = _snapshot(root)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert _snapshot(root) == before


@pytest.mark.parametrize("case", CASES)
def test_bad_train_input(world, case, capsys, monkeypatch):
    root, corpus, env = world
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    extra, needle = CASES[case]
    argv = ["train", *tiny_flags(root / "new-run", corpus), *(a.format(root=root) for a in extra)]
    _check(root, argv, needle, capsys)


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_resume(world, case, capsys, monkeypatch):
    root, _, env = world
    monkeypatch.setenv("KILN_CACHE", env["KILN_CACHE"])
    name, needle = RESUME_CASES[case]
    _check(root, ["train", "--run.dir", str(root / name), "--resume"], needle, capsys)


def test_incomplete_checkpoint_for_generate(world, capsys):
    root, _, _ = world
    step = root / "incomplete/checkpoints/step-0000002"
    (step / "kiln.json").rename(step.parent / "kiln.json.moved")
    try:
        _check(root, ["generate", str(step)], "is incomplete (no kiln.json)", capsys)
    finally:
        (step.parent / "kiln.json.moved").rename(step / "kiln.json")


def test_bad_yaml_exits_2_from_the_real_process(world):
    root, _, env = world
    before = _snapshot(root)
    result = kiln(["train", "--config", str(root / "bad.yaml")], env)
    assert result.returncode == 2 and "does not parse as YAML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(root) == before


HELP = {  # verb: (its own flags, a phrase of its one-line description)
    "perf": (["--preset", "--device", "--json", "--figure"], "MFU of each operator"),
    "estimate-memory": (["--world-size", "--nproc"], "each rank's training memory"),
}


@pytest.mark.parametrize("verb", HELP)
def test_help_of_a_verb_taking_train_flags_is_its_own(verb, capsys):
    """perf and estimate-memory printed train's usage and none of their own flags before."""
    flags, description = HELP[verb]
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kiln {verb} "), out[:200]
    assert description in " ".join(out.split())
    own = out.split(f"\n{verb} options:\n", 1)[1].split("\n\n", 1)[0]  # the verb's group
    for flag in flags:
        assert flag in own, (flag, own)
    assert "--model.preset" in out and "--parallel.tensor" in out  # train's flags still follow
    assert "--resume" not in out  # refused by these verbs, so not offered


def test_perf_help_lists_the_devices_and_defaults(capsys):
    from kiln.planning.hardware import DEVICES

    assert main(["perf", "--help"]) == 0
    own = " ".join(capsys.readouterr().out.split("\nperf options:\n", 1)[1].split())
    assert all(name in own for name in DEVICES) and "default: cpu" in own


def test_train_help_is_unchanged_by_the_other_verbs_flags(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kiln train [--config CONFIG] [--resume [auto|CHECKPOINT]]")
    assert "options:\n" in out and "--nproc" not in out and "--figure" not in out


VERB_CASES = {
    "unknown device": (["perf", "--device", "nosuch"], "device 'nosuch' is not in the hardware"),
    "device without a value": (["perf", "--device"], "--device needs a value."),
    "json is a switch": (["perf", "--json=false"], "--json is a switch and takes no value"),
    "misspelt perf flag": (["perf", "--devic", "H100"], "did you mean '--device'"),
    "unknown preset": (["perf", "--preset", "nosuch"], "model.preset is 'nosuch'"),
    "perf resume": (["perf", "--resume"], "perf takes a config, not --resume."),
    "zero ranks": (["estimate-memory", "--nproc", "0"], "--nproc is 0 but must be > 0."),
    "ranks not a number": (["estimate-memory", "--nproc", "x"], "--nproc must be int, got 'x'."),
    "ranks without a value": (["estimate-memory", "--world-size"], "--world-size needs a value."),
    "perf flag on estimate-memory": (["estimate-memory", "--device", "H100"], "Unknown option"),
    "estimate-memory resume": (["estimate-memory", "--resume"], "takes a config, not --resume."),
}


@pytest.mark.parametrize("case", VERB_CASES)
def test_bad_input_to_perf_and_estimate_memory(case, capsys):
    argv, needle = VERB_CASES[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert needle in lines[0], lines[0]
    assert captured.out == ""


def test_own_flags_of_perf_and_estimate_memory_reach_the_verb(capsys):
    """--preset wins over --model.preset (it did as a popped flag), a bare --json is JSON, and
    the last of --world-size / --nproc gives the number of ranks."""
    import json

    assert main(["perf", "--model.preset", "llama-tiny", "--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny"
    assert main(["estimate-memory", "--world-size=3", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 rank(s)" in out and "ddp×2" in out
