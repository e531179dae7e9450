"""Test-only fault injection: ``KILN_TEST_CRASH_AT`` makes a process SIGKILL itself at a named
point, so the resume tests can crash a run exactly where they mean to.

Values: ``step:N`` (after optimizer step N, before its checkpoint), ``save:N`` (inside the
checkpoint write of step N, after DCP and kiln.json are on disk but before the rename), each
optionally followed by ``@R`` to crash only rank R. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """SIGKILL this process if ``KILN_TEST_CRASH_AT`` names ``name`` (and this rank)."""
    spec = os.environ.get("KILN_TEST_CRASH_AT")
    if not spec:
        return
    point, _, rank = spec.partition("@")
    if point == name and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
