"""Atomic, resharding checkpoints on torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step-NNNNNNN/`` holds DCP's shards (model + optimizer tensors,
saved by every rank, resharded on load for any world size) and ``kiln.json`` — step, tokens,
config hash, model shape, data-loader position, kiln/torch versions — written last. Each
checkpoint is first written to ``.tmp-step-NNNNNNN`` and renamed into place only when complete,
so a crash at any moment, mid-write included, leaves the newest *complete* checkpoint loadable.
Plain counters live in the JSON file, tensors in DCP; nothing is unpickled on load beyond DCP's
own metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from kiln import __version__
from kiln.errors import CheckpointError

META = "kiln.json"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def config_hash(shape: dict[str, Any]) -> str:
    """Short stable hash of a model shape (what must match for a checkpoint to load)."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (a kiln.json present) under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_meta(path: Path) -> dict[str, Any]:
    """The kiln.json of a checkpoint directory, or a CheckpointError saying what is wrong."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(
            f"Checkpoint {path} is incomplete (no {META}); use a complete step-* directory."
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"Checkpoint metadata {meta_path} is not valid JSON ({exc})."
        ) from exc


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The DCP state: model and optimizer keyed by parameter name (so any sharding reloads),
    plus extra tensors (RNG state, sparsity masks, ...)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if extra:
        state["extra"] = extra
    return state


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically (all ranks call this) and prune to ``keep``."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(tensor_state(model, optimizer, extra), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        meta = dict(meta, step=step, kiln_version=__version__, torch_version=torch.__version__)
        meta_tmp = tmp / (META + ".tmp")
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / META)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``path`` into ``model`` / ``optimizer`` / ``extra`` in place (any world size);
    return its kiln.json."""
    meta = read_meta(path)
    if optimizer is None:
        model_sd = get_state_dict(model, [], options=StateDictOptions())[0]
        state: dict[str, Any] = {"model": model_sd}
    else:
        state = tensor_state(model, optimizer)
    if extra:
        state["extra"] = extra
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises a CheckpointException listing per-rank failures
        raise CheckpointError(
            f"Checkpoint {path} does not fit this model/optimizer ({_first_line(exc)})."
        ) from exc
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    return meta


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when used without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def clean_partial(root: Path) -> None:
    """Remove leftovers of a checkpoint write that crashed (rank 0, at start-up)."""
    root = Path(root)
    if _rank() == 0 and root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)
