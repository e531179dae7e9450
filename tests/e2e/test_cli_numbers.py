"""Every numeric option of generate, eval, plan, scale, mup, convert and estimate-memory is
checked before the verb touches a file: a value outside its range exits 2 with one sentence
naming the flag, and nothing under the test's root (a run, its would-be outputs) changes.

The cases call ``kiln.cli.main`` in-process on a real (tiny, untrained) Kiln run, so a check
that went missing would show as exit 0 (``generate --max-new-tokens -1`` printed nothing and
exited 0 before) or as another error than the one expected.
"""

import pytest

from kiln.cli import main
from tests.e2e.helpers import untrained_run
from tests.e2e.test_cli_errors import _snapshot


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    untrained_run(root)
    (root / "task.jsonl").write_text('{"context": "the cat", "choices": [" sat"], "gold": 0}\n')
    (root / "task.yaml").write_text("name: cats\ndata: task.jsonl\n")
    return root


GEN = ["generate", "{run}", "--prompt", "the"]
EVAL = ["eval", "{run}", "--tasks", "{root}/task.yaml", "--json", "{root}/out.json"]
SCALE = ["scale", "--run.dir", "{root}/scale"]
CASES = [
    (GEN + ["--max-new-tokens", "-1"], "--max-new-tokens is -1 but must be > 0"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens is 0"),
    (GEN + ["--num-samples", "0"], "--num-samples is 0"),
    (GEN + ["--top-k", "0"], "--top-k is 0"),
    (GEN + ["--top-k", "-3"], "--top-k is -3"),
    (GEN + ["--top-p", "0"], "--top-p is 0.0 but must be in (0, 1]"),
    (GEN + ["--top-p", "1.5"], "--top-p is 1.5"),
    (GEN + ["--top-p=-1e3"], "--top-p is -1000.0"),
    (GEN + ["--temperature", "-0.5"], "--temperature is -0.5 but must be >= 0"),
    (GEN + ["--seed", "-1"], "--seed is -1"),
    (GEN + ["--top-p", "nan"], "--top-p must be a finite float"),
    (EVAL + ["--shots", "-1"], "--shots is -1"),
    (EVAL + ["--limit", "0"], "--limit is 0"),
    (EVAL + ["--batch-size", "0"], "--batch-size is 0"),
    (EVAL + ["--max-length", "-8"], "--max-length is -8"),
    (["plan", "--flops", "0"], "--flops is 0.0"),
    (["plan", "--params", "-1e8"], "--params is -100000000.0"),
    (["plan", "--params", "1e8", "--tokens-per-param", "0"], "--tokens-per-param is 0.0"),
    (["plan", "--params", "1e8", "--batch-size", "0"], "--batch-size is 0"),
    (["plan", "--params", "1e8", "--seq-len", "-1"], "--seq-len is -1"),
    (["plan", "--params", "1e8", "--vocab", "0"], "--vocab is 0"),
    (["plan", "--params", "1e8", "--count", "0"], "--count is 0"),
    (["plan", "--params", "1e8", "--mfu", "1.5"], "--mfu is 1.5 but must be in (0, 1]"),
    (["plan", "--flops", "inf"], "--flops must be a finite float"),
    (SCALE + ["--widths", "16,0,32,48,64"], "--widths value is 0"),
    (SCALE + ["--tokens-per-param", "20,-1"], "--tokens-per-param value is -1.0"),
    (SCALE + ["--n-layers", "0"], "--n-layers is 0"),
    (SCALE + ["--lr", "0"], "--lr is 0.0"),
    (SCALE + ["--jobs", "0"], "--jobs is 0"),
    (SCALE + ["--max-steps", "0"], "--max-steps is 0"),
    (SCALE + ["--bootstrap", "-1"], "--bootstrap is -1"),
    (SCALE + ["--checkpoint-every", "-5"], "--checkpoint-every is -5"),
    (["scale", "--predict", "-5", "--fit", "cerebras-gpt-pile"], "--predict is -5.0"),
    (["mup", "coord-check", "--steps", "0", "--out", "{root}/c.png"], "--steps is 0"),
    (["mup", "coord-check", "--widths", "64,-1", "--out", "{root}/c.png"], "--widths value is -1"),
    (["convert", "{run}", "{root}/hf", "--dtype", "float8"], "--dtype is 'float8'"),
    (["estimate-memory", "--world-size", "0"], "--world-size is 0 but must be > 0"),
    (["estimate-memory", "--train.batch_size", "0"], "train.batch_size is 0"),
]


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_number_exits_2_and_changes_nothing(root, argv, needle, capsys):
    argv = [a.format(root=root, run=root / "run") for a in argv]
    before = _snapshot(root)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert needle in lines[0], lines[0]
    assert captured.out == ""
    assert _snapshot(root) == before
    assert not any((root / n).exists() for n in ("out.json", "scale", "c.png", "hf"))


def test_boundary_values_are_accepted(root, capsys):
    """Greedy (temperature 0), top-p 1 and top-k 1 are meaningful and must still work."""
    argv = ["generate", str(root / "run"), "--prompt", "the", "--max-new-tokens", "4",
            "--temperature", "0", "--top-p", "1", "--top-k", "1", "--num-samples", "2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    # greedy: both samples are the same continuation of the prompt
    samples = [s.strip() for s in out.split("--- sample")[1:]]
    assert samples[0].split("\n", 1)[1] == samples[1].split("\n", 1)[1]
