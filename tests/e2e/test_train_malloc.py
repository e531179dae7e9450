"""`KILN_MALLOC_TUNING=memory` reaches `kiln train`: the run says malloc returns freed blocks to
the kernel (the setting for a run under a memory cap, kiln.train.malloc) and trains."""

import sys

import pytest

from tests.e2e.helpers import kiln, tiny_flags


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_memory_setting_is_applied_and_said(tmp_path, corpus, kiln_env):
    env = {**kiln_env, "KILN_MALLOC_TUNING": "memory"}
    result = kiln(["train", *tiny_flags(tmp_path / "run", corpus, steps=2)], env)
    assert result.returncode == 0, result.stderr
    assert "malloc returns freed blocks to the kernel" in result.stdout
    assert "malloc reuses freed blocks" not in result.stdout


def test_train_fixes_the_thread_count_for_the_run(tmp_path, corpus, cache_env, monkeypatch):
    """kiln train calls torch.set_num_threads with the current count before it builds the model:
    that is what turns MKL's dynamic threading off (it may otherwise run a GEMM on fewer threads
    and round differently), so a resumed run repeats an uninterrupted one bit for bit."""
    import torch

    from kiln.cli import main

    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    assert main(["train", *tiny_flags(tmp_path / "run", corpus, steps=1)]) in (0, None)
    assert calls and calls[0] == torch.get_num_threads()
