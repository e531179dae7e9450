"""Disk space for checkpoints: about how many bytes one takes, the check at start, and the
one sentence a failed write ends in.

Faults of the machine end in one sentence, never a traceback: a write that fails (disk full, I/O
error) removes its partial ``.tmp-step-*`` and raises :class:`StorageError` naming the cause, the
size needed and free, and the intact previous checkpoint.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

from kiln.train.checkpoint_read import first_line, latest_checkpoint, list_checkpoints
from kiln.train.faults import free_bytes

MiB = 2**20
TENSOR_OVERHEAD = 2048  # bytes DCP's torch.save adds per tensor (1.8 KiB measured on 2.13)
GROUP_ENTRY_BYTES = 1440  # one flattened param-group value (lr, betas, ...) on disk, measured
GROUP_ENTRIES = 13  # AdamW's param-group keys (+ names, lr_mult), stored once per parameter


class StorageError(Exception):
    """A checkpoint could not be written (disk full, I/O error): the machine, not the user;
    the message is one sentence and ``kiln train`` exits 3."""


def state_bytes(state: Any) -> int:
    """About the bytes a (nested) state dict takes on disk: each tensor's data and DCP's
    per-tensor record."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() + TENSOR_OVERHEAD
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _errno_of(exc: BaseException) -> int | None:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(root: Path, step: int, need: int, exc: BaseException) -> StorageError:
    """One sentence for a failed write: cause, size needed and free, what is still intact."""
    free = free_bytes(root)
    code = _errno_of(exc)
    if code == errno.ENOSPC or (code is None and free < need):
        cause = f"no space left on the device holding {root}"
    else:
        cause = f"the write failed ({first_line(exc)})"
    prev = latest_checkpoint(root)
    kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    return StorageError(
        f"checkpoint step {step} could not be written: {cause} (it needs about "
        f"{need / MiB:.1f} MiB, {free / MiB:.1f} MiB are free); {kept} and the partial write "
        "was removed — free space or lower --checkpoint.keep, then continue with --resume."
    )


def check_space(root: Path, need: int, keep: int, log) -> None:
    """At start: refuse if ``root`` cannot hold one more checkpoint of ``need`` bytes; say so
    if it cannot hold the ``keep`` + 1 that exist while the newest is written."""
    free = free_bytes(root)
    held = sum(_dir_bytes(c) for c in list_checkpoints(root))
    size = f"a checkpoint needs about {need / MiB:.1f} MiB and {free / MiB:.1f} MiB are free"
    if free < need:
        raise StorageError(
            f"the device holding {root} has no room for a checkpoint ({size}); free space or "
            "choose another --run.dir."
        )
    if free + held < (keep + 1) * need:
        log(
            f"warning: {root} cannot hold checkpoint.keep + 1 = {keep + 1} checkpoints ({size}); "
            "the run will stop at the checkpoint that does not fit, keeping the previous one."
        )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
