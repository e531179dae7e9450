"""Fixtures for the multi-process tests: the e2e corpus and environment, free ports, and a
torchrun launch of the CLI."""

import socket
import subprocess
import sys

from tests.e2e.conftest import cache_env, corpus, kiln_env  # noqa: F401  (re-exported fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node n -m kiln.cli ARGS``, output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "kiln.cli", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
