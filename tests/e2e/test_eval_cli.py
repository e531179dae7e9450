"""kiln convert / eval / data through the CLI: a user task end to end, and bad inputs exit 2."""

import json
import os

import pytest

from tests.e2e.helpers import kiln, untrained_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    untrained_run(root)
    rows = [{"context": f"the cat {i}", "choices": [" sat", " ran"], "gold": i % 2}
            for i in range(6)]  # fmt: skip
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text("name: cats\ndata: items.jsonl\n")
    # A GPT-2 folder whose tokenizer has more tokens than the embedding has rows.
    small = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(small).save_pretrained(root / "mismatch")
    (root / "mismatch" / "tokenizer.json").write_bytes(
        (root / "run" / "tokenizer.json").read_bytes()
    )
    env = dict(os.environ, KILN_CACHE=str(root / "cache"), PYTHONPATH="src")
    return root, env


def _one_sentence_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_eval_user_task_json_and_hf_round_trip(setup):
    root, env = setup
    out = root / "res.json"
    p = kiln(["eval", str(root / "run"), "--tasks", str(root / "task.yaml"), "--shots", "1",
              "--json", str(out)], env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "acc_norm" in p.stdout
    report = json.loads(out.read_text())
    assert report["results"]["cats"]["n"] == 6 and 0 <= report["results"]["cats"]["acc"] <= 1
    assert {"acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(report["results"]["cats"])
    assert report["config"]["shots"] == 1
    p = kiln(["convert", str(root / "run"), str(root / "hf")], env)
    assert p.returncode == 0, p.stderr
    p = kiln(["eval", str(root / "hf"), "--tasks", str(root / "task.yaml"), "--shots", "1",
              "--json", str(root / "res_hf.json")], env)  # fmt: skip
    via_hf = json.loads((root / "res_hf.json").read_text())["results"]["cats"]
    for metric in ("acc", "acc_norm"):
        assert via_hf[metric] == report["results"]["cats"][metric]


def test_bad_inputs_exit_2(setup):
    root, env = setup
    msg = _one_sentence_error(kiln(["eval", str(root / "run"), "--tasks", "helaswag"], env))
    assert "hellaswag" in msg
    msg = _one_sentence_error(kiln(["convert", str(root / "mismatch"), str(root / "x")], env))
    assert "50 rows" in msg
    cfg = json.loads((root / "mismatch" / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (root / "mismatch" / "config.json").write_text(json.dumps(cfg))
    msg = _one_sentence_error(kiln(["convert", str(root / "mismatch"), str(root / "y")], env))
    assert "MambaForCausalLM" in msg
    msg = _one_sentence_error(kiln(["convert", str(root / "run"), str(root / "run")], env))
    assert "not empty" in msg
