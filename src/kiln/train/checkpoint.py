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
"""

from __future__ import annotations

import contextlib
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
from kiln.train.faults import crash_point

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
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
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


def _set_state(model, optimizer, state: dict[str, Any]) -> None:
    """Give each part (and its optimizer) its own keys of the loaded state."""
    for part, opt in _parts(model, optimizer):
        own_model, own_optim = get_state_dict(part, [] if opt is None else opt, options=FLAT)
        model_sd = {k: state["model"][k] for k in own_model}
        optim_sd = {k: state["optim"][k] for k in own_optim} if opt is not None else {}
        set_state_dict(part, [] if opt is None else opt, model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=FLAT)  # fmt: skip


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
        writer = FileSystemWriter(str(tmp), sync_files=True)
        dcp.save(tensor_state(model, optimizer, extra), storage_writer=writer)
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
        crash_point(f"save:{step}")  # test-only: SIGKILL here leaves a complete .tmp dir
        if final.exists():  # re-saving the same step: move the old copy aside first
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            _discard(old)
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
    state = tensor_state(model, optimizer)
    if extra:
        state["extra"] = extra
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(
            f"Checkpoint {path} cannot be loaded into this model and optimizer: it is "
            f"incomplete or from another shape ({_first_line(exc)})."
        ) from exc
    _set_state(model, optimizer, state)
    return meta


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
