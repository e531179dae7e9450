"""Test-only fault injection, so the resume and fault tests can make a run fail exactly where
they mean to. Unset (always, outside tests) nothing here changes anything.

``KILN_TEST_CRASH_AT`` makes a process SIGKILL itself at a named point: ``step:N`` (after
optimizer step N, before its checkpoint), ``save:N`` (inside the checkpoint write of step N,
after DCP and kiln.json are on disk but before the rename).

``KILN_TEST_FAULT=enospc:save:N`` makes the checkpoint write of step N fail as a full disk does
(``OSError(ENOSPC)`` after DCP wrote its shards, before kiln.json). ``KILN_TEST_DISK_FREE=BYTES``
makes :func:`free_bytes` report that much free space. Every point may be followed by ``@R`` to
act on rank R only.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path


def _named(spec: str | None, name: str) -> bool:
    if not spec:
        return False
    point, _, rank = spec.partition("@")
    return point == name and (not rank or rank == os.environ.get("RANK", "0"))


def crash_point(name: str) -> None:
    """SIGKILL this process if ``KILN_TEST_CRASH_AT`` names ``name`` (and this rank)."""
    if _named(os.environ.get("KILN_TEST_CRASH_AT"), name):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str) -> None:
    """Raise ENOSPC if ``KILN_TEST_FAULT`` is ``enospc:`` followed by ``name``."""
    if _named(os.environ.get("KILN_TEST_FAULT"), f"enospc:{name}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    fake = os.environ.get("KILN_TEST_DISK_FREE")
    if fake:
        return int(fake)
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
