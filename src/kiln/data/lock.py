"""One preparer at a time: a lock file beside the cache, that works across nodes.

Under torchrun every rank calls ``prepare_data``; the first to create the lock file (``O_EXCL``,
atomic on local and network file systems) prepares, and the others wait for it to go away, then
find the cache ready. The holder touches the file every few seconds; a lock not touched for
``STALE_S`` (or naming a process of this machine that is gone) belonged to a process that died
and is taken over. A waiter gives up after
``DataConfig.prepare_timeout_s`` with a sentence saying who holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kiln.errors import DataError

HEARTBEAT_S = 5.0
"""How often the holder touches its lock file."""
STALE_S = 60.0
"""A lock untouched this long is taken over (its holder died)."""


@contextlib.contextmanager
def preparation_lock(path: Path, timeout_s: float, what: str, log=print) -> Iterator[None]:
    """Hold ``path`` while the body runs; wait (at most ``timeout_s``) while another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    announced = False
    while not _try_create(path):
        holder = _holder(path)
        if holder is None:
            continue  # released between our two looks: try again
        if time.time() - holder[1] > STALE_S or _died_here(holder[0]):
            _take_over(path)
            continue
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise DataError(
                f"waited {waited:.0f} s for {holder[0]} to finish preparing {what} (lock "
                f"{path}); raise data.prepare_timeout_s, or prepare it first with "
                "`kiln data prepare`."
            )
        if not announced:
            log(f"data: waiting for {holder[0]}, which is preparing {what}")
            announced = True
        time.sleep(0.2 if waited < 5 else 1.0)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        path.unlink(missing_ok=True)


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    return True


def _holder(path: Path) -> tuple[str, float] | None:
    """(who, last heartbeat time) of the lock, or None if it is gone."""
    try:
        return path.read_text().strip() or "another process", path.stat().st_mtime
    except FileNotFoundError:
        return None


def _died_here(holder: str) -> bool:
    """True if the holder was a process on this machine that no longer exists."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "process" or parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _take_over(path: Path) -> None:
    """Remove a stale lock; the rename makes sure only one waiter removes it."""
    grave = path.with_name(f"{path.name}.stale-{os.getpid()}-{socket.gethostname()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, grave)
        grave.unlink()


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
