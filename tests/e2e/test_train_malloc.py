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
