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

Loading never unpickles arbitrary objects. On torch 2.13 DCP's ``FileSystemReader`` reads
``.metadata`` with plain ``pickle.load`` and its ``DefaultLoadPlanner`` reads every non-tensor
value (optimizer hyper-parameters) with ``torch.load(weights_only=False)``; tensors themselves
use ``weights_only=True``. :class:`SafeReader` unpickles ``.metadata`` with an allow-list (DCP's
metadata classes, ``torch.Size``, dtypes, paths) and :class:`SafePlanner` loads non-tensor values
with ``weights_only=True``, so a tampered checkpoint fails with a CheckpointError instead of
running code. Plain counters live in kiln.json, tensors in DCP.

Faults of the machine end in one sentence, never a traceback: a write that fails (disk full, I/O
error) removes its partial ``.tmp-step-*`` and raises :class:`StorageError` naming the cause, the
size needed and free, and the intact previous checkpoint; a damaged or tampered checkpoint
(:func:`verify_checkpoint`: unparseable kiln.json, ``.metadata`` unreadable or asking for a
refused global, a shard missing or shorter than the metadata says) raises a CheckpointError
naming the file and the newest older checkpoint that is intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import (
    CheckpointException,
    DefaultLoadPlanner,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from kiln import __version__
from kiln.errors import CheckpointError
from kiln.train.faults import crash_point, fault_point, free_bytes

META = "kiln.json"
MiB = 2**20
TENSOR_OVERHEAD = 2048  # bytes DCP's torch.save adds per tensor (1.8 KiB measured on 2.13)
GROUP_ENTRY_BYTES = 1440  # one flattened param-group value (lr, betas, ...) on disk, measured
GROUP_ENTRIES = 13  # AdamW's param-group keys (+ names, lr_mult), stored once per parameter


class StorageError(Exception):
    """A checkpoint could not be written (disk full, I/O error): the machine, not the user;
    the message is one sentence and ``kiln train`` exits 3."""


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


REFUSED = "refusing to unpickle "


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: any other global is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    GLOBALS = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")),
    }

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not (module in self.MODULES or (module, name) in self.GLOBALS or dtype):
            raise pickle.UnpicklingError(f"{REFUSED}{module}.{name}")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` is unpickled through an allow-list (the body
    mirrors torch 2.13's ``read_metadata`` with ``pickle.load`` swapped for the allow-list)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _AllowListUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that decodes non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


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
        raise _write_failure(root, step, state_bytes(state), exc) from exc
    if _rank() == 0:
        for old in list_checkpoints(root)[:-keep]:
            _discard(old)
    _barrier()
    return final


def _write(tmp: Path, final: Path, state: dict[str, Any], meta: dict[str, Any], step: int) -> None:
    """DCP shards (every rank), then kiln.json and the rename (rank 0)."""
    with _quiet_single_process():
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


def _write_failure(root: Path, step: int, need: int, exc: BaseException) -> StorageError:
    """One sentence for a failed write: cause, size needed and free, what is still intact."""
    free = free_bytes(root)
    code = _errno_of(exc)
    if code == errno.ENOSPC or (code is None and free < need):
        cause = f"no space left on the device holding {root}"
    else:
        cause = f"the write failed ({_first_line(exc)})"
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
        with _quiet_single_process(), _no_dcp_logs():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(
            f"Checkpoint {path} cannot be loaded into this model and optimizer: it holds other "
            f"tensors than this run's ({_first_line(exc)})."
        ) from exc
    return meta


def stored_keys(path: Path) -> set[str]:
    """The flattened names of everything in a checkpoint's DCP shards ("model.<fqn>",
    "optim.state.<fqn>.exp_avg", "extra.rng_cpu", ...)."""
    return set(SafeReader(str(path)).read_metadata().state_dict_metadata)


def verify_checkpoint(path: Path) -> None:
    """Raise a CheckpointError naming the damaged file (and the newest older intact checkpoint
    to continue from) unless ``path`` is readable: kiln.json parses, ``.metadata`` unpickles
    through the allow-list, every shard is at least as long as the metadata says."""
    path = Path(path)
    if not (path / META).is_file():
        read_meta(path)  # an incomplete directory (no kiln.json) keeps its own sentence
    problem = _problem(path)
    if problem:
        raise CheckpointError(f"Checkpoint {path} is damaged: {problem}; {_way_on(path)}")


def _problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (the file and why), or None if nothing."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        return f"{META} does not parse ({_first_line(exc)})"
    if not isinstance(meta, dict) or not {"step", "model_shape"} <= meta.keys():
        return f"{META} lacks step or model_shape"
    try:
        metadata = SafeReader(str(path)).read_metadata()
    except FileNotFoundError:
        return ".metadata is missing"
    except pickle.UnpicklingError as exc:
        if str(exc).startswith(REFUSED):
            culprit = str(exc)[len(REFUSED) :]
            return (
                f".metadata was refused: unpickling it would call {culprit} (it was tampered with)"
            )
        return f".metadata is unreadable ({_first_line(exc)})"
    except Exception as exc:  # EOFError, ValueError, ... from a truncated pickle
        return f".metadata is unreadable or truncated ({type(exc).__name__}: {_first_line(exc)})"
    ends: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        name = info.relative_path
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        if not (path / name).is_file():
            return f"shard {name} is missing"
        size = (path / name).stat().st_size
        if size < end:
            return f"shard {name} is truncated ({size:,} bytes, the metadata needs {end:,})"
    return None


def _way_on(path: Path) -> str:
    """How to go on after checkpoint ``path`` proved damaged: the newest older intact one."""
    step = int(STEP_DIR.match(path.name).group(1)) if STEP_DIR.match(path.name) else None
    older = [c for c in list_checkpoints(path.parent) if c != path]
    if step is not None:
        older = [c for c in older if int(STEP_DIR.match(c.name).group(1)) < step]
    for candidate in reversed(older):
        if _problem(candidate) is None:
            return (
                f"the older checkpoint {candidate.name} is intact — continue from it with "
                f"'kiln train --resume {candidate.name}', or give {candidate} to kiln generate."
            )
    return f"no older intact checkpoint is left in {path.parent}."


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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, keyed by DCP's flattened name ("model.blocks.0...",
    "optim.state...", "extra.rng_cpu"), on CPU in one process (for tests and inspection)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeReader(str(path)).read_metadata()
    state = {
        name: torch.empty(md.size, dtype=md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    with _quiet_single_process():
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=True)
    return state


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when used without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


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
