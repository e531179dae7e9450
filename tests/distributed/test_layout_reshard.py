"""Layouts `kiln train` refuses before any work. A checkpoint resuming under other layouts is
tested in test_reshard_chain.py (FSDP2 × 4 → TP2 × PP2 → PP2 × DP2 → 1 process, against an
uninterrupted run, model, AdamW state and data position included)."""

from tests.e2e.helpers import kiln, tiny_flags


def test_bad_layouts_get_one_sentence_and_exit_2(tmp_path, corpus, kiln_env):
    cases = [
        (["--parallel.tensor", "2"], "parallel.tensor 2 × parallel.pipeline 1 × "
         "parallel.data_replicate 1 = 2 does not divide the world size 1"),
        (["--parallel.pipeline_schedule", "Zigzag"], "parallel.pipeline_schedule"),
    ]  # fmt: skip
    for flags, sentence in cases:
        run = tmp_path / "bad"
        result = kiln(["train", *tiny_flags(run, corpus, steps=2), *flags], kiln_env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert sentence in result.stderr and "Traceback" not in result.stderr
        assert not (run / "config.yaml").exists()
