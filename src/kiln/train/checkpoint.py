"""Atomic, resharding checkpoints on torch.distributed.checkpoint (DCP).

Layout: ``RUN_DIR/checkpoints/step-NNNNNNN/`` holds DCP's shards (model + optimizer tensors,
saved by every rank, resharded on load for any world size) and ``kiln.json`` — step, tokens,
config hash, model shape, data-loader position, kiln/torch versions — written last. Each
checkpoint is first written to ``.tmp-step-NNNNNNN`` and renamed into place only when complete,
so a crash at any moment, mid-write included, leaves the newest *complete* checkpoint loadable.
DCP fsyncs every file it writes; kiln.json and both directories are fsynced before and after the
rename. Old checkpoints are renamed to ``.trash-step-*`` (atomic) before they are deleted, so a
crash while pruning never leaves a half-deleted directory that looks complete; leftovers of
either kind are removed at the next start.

Reading a checkpoint without trusting it (listing, the allow-listed unpickling, verification)
is kiln.train.checkpoint_read; disk space and the sentence a failed write ends in,
kiln.train.checkpoint_space. Their public names are importable from here too. Which parts of a
run go into a checkpoint is kiln.train.state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from kiln import __version__
from kiln.errors import CheckpointError
from kiln.train.checkpoint_read import (
    META,
    STEP_DIR,
    SafePlanner,
    SafeReader,
    first_line,
    latest_checkpoint,
    list_checkpoints,
    quiet_single_process,
    read_meta,
    read_tensors,
    step_dir,
    stored_keys,
    verify_checkpoint,
)
from kiln.train.checkpoint_space import (
    GROUP_ENTRIES,
    GROUP_ENTRY_BYTES,
    TENSOR_OVERHEAD,
    StorageError,
    check_space,
    state_bytes,
    write_failure,
)
from kiln.train.faults import crash_point, fault_point

__all__ = [
    "GROUP_ENTRIES",
    "GROUP_ENTRY_BYTES",
    "META",
    "STEP_DIR",
    "TENSOR_OVERHEAD",
    "StorageError",
    "check_space",
    "clean_partial",
    "config_hash",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint",
    "read_meta",
    "read_tensors",
    "save_checkpoint",
    "set_tensor_state",
    "state_bytes",
    "step_dir",
    "stored_keys",
    "tensor_state",
    "verify_checkpoint",
    "write_checkpoint",
]


def config_hash(shape: dict[str, Any]) -> str:
    """Short stable hash of a model shape (what must match for a checkpoint to load)."""
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


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


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimizer state keyed by parameter name (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
the same keys whichever stage, shard or optimizer holds a parameter, so any layout reloads it."""


def _parts(model, optimizer) -> list[tuple[nn.Module, Any]]:
    """(model part, its optimizer) pairs: one per pipeline stage this rank holds."""
    parts = list(model) if isinstance(model, list | tuple) else [model]
    if optimizer is None:
        return [(p, None) for p in parts]
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    return list(zip(parts, optimizers, strict=True))


def tensor_state(model, optimizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DCP state: model and optimizer keyed by parameter name (so any sharding and any
    pipeline split reloads), plus extra tensors (RNG state, sparsity masks, ...). ``model`` is a
    module or the list of model parts this rank holds, ``optimizer`` one optimizer or a
    kiln.train.optim.Optimizers with one per part."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for part, opt in _parts(model, optimizer):
        if opt is None:
            model_sd.update(get_state_dict(part, [], options=FLAT)[0])
            continue
        m, o = get_state_dict(part, opt, options=FLAT)
        model_sd.update(m)
        optim_sd.update(o)
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    if extra:
        state["extra"] = extra
    return state


def set_tensor_state(model, optimizer, state: dict[str, Any]) -> None:
    """Give each part (and its optimizer) its own keys of a loaded :func:`tensor_state`."""
    for part, opt in _parts(model, optimizer):
        own_model, own_optim = get_state_dict(part, [] if opt is None else opt, options=FLAT)
        model_sd = {k: state["model"][k] for k in own_model}
        optim_sd = {k: state["optim"][k] for k in own_optim} if opt is not None else {}
        # fused/foreach are this layout's kernel choice (no fused AdamW over DTensors), not state
        kernels = (
            [] if opt is None else [(g.get("fused"), g.get("foreach")) for g in opt.param_groups]
        )
        set_state_dict(part, [] if opt is None else opt, model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=FLAT)  # fmt: skip
        for group, (fused, foreach) in zip([] if opt is None else opt.param_groups, kernels):
            group["fused"], group["foreach"] = fused, foreach


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` of ``model``/``optimizer``/``extra`` atomically (all ranks
    call this) and prune to ``keep``."""
    return write_checkpoint(root, step, tensor_state(model, optimizer, extra), meta, keep)


def write_checkpoint(
    root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 3
) -> Path:
    """Write checkpoint ``step`` atomically: ``state`` (nested dicts of tensors and values) to
    DCP's shards, ``meta`` to kiln.json (all ranks call this); prune to ``keep``."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    try:
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        _write(tmp, final, state, meta, step)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(root, step, state_bytes(state), exc) from exc
    if _rank() == 0:
        for old in list_checkpoints(root)[:-keep]:
            _discard(old)
    _barrier()
    return final


def _write(tmp: Path, final: Path, state: dict[str, Any], meta: dict[str, Any], step: int) -> None:
    """DCP shards (every rank), then kiln.json and the rename (rank 0)."""
    with quiet_single_process():
        writer = FileSystemWriter(str(tmp), sync_files=True)
        dcp.save(state, storage_writer=writer)
    fault_point(f"save:{step}")  # test-only: a full disk after the shards are written
    _barrier()
    if _rank() != 0:
        return
    meta = dict(meta, step=step, kiln_version=__version__, torch_version=torch.__version__)
    meta_tmp = tmp / (META + ".tmp")
    with open(meta_tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_tmp, tmp / META)
    _fsync_dir(tmp)
    crash_point(f"save:{step}")  # test-only: SIGKILL here leaves a complete .tmp dir
    if final.exists():  # re-saving the same step: move the old copy aside first
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``path`` into ``model`` / ``optimizer`` / ``extra`` in place (any world size);
    return its kiln.json."""
    verify_checkpoint(path)  # before the optimizer's state is touched
    state = tensor_state(model, optimizer)
    if extra:
        state["extra"] = extra
    meta = read_checkpoint(path, state, verified=True)
    set_tensor_state(model, optimizer, state)
    return meta


def read_checkpoint(path: Path, state: dict[str, Any], verified: bool = False) -> dict[str, Any]:
    """Load checkpoint ``path``'s DCP shards into ``state`` in place (its current tensors are
    the templates, resharded to their layout); return its kiln.json. ``verified``: the caller
    has just run :func:`verify_checkpoint`."""
    if not verified:
        verify_checkpoint(path)
    meta = read_meta(path)
    try:
        with quiet_single_process(), _no_dcp_logs():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(
            f"Checkpoint {path} cannot be loaded into this model and optimizer: it holds other "
            f"tensors than this run's ({first_line(exc)})."
        ) from exc
    return meta


@contextlib.contextmanager
def _no_dcp_logs():
    """DCP logs its own tracebacks (e.g. 'Global metadata is not found') before raising; the
    error Kiln raises says what is wrong, so those stay off the terminal (torch 2.13 logs them
    on the root logger)."""
    import logging

    logger = logging.getLogger()
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def _discard(path: Path) -> None:
    """Rename to ``.trash-*`` (atomic: it stops counting as a checkpoint), then delete."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(root: Path) -> list[str]:
    """Remove leftovers of a checkpoint write or prune that crashed (rank 0, at start-up);
    return their names."""
    root = Path(root)
    removed = []
    if _rank() == 0 and root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name.startswith((".tmp-step-", ".trash-step-")):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed
