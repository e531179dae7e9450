"""Finding and reading Kiln checkpoints without trusting them.

A complete checkpoint is a ``step-NNNNNNN`` directory that holds ``kiln.json`` (it is written
last, see kiln.train.checkpoint); :func:`list_checkpoints` finds them, :func:`read_meta` reads
kiln.json.

Loading never unpickles arbitrary objects. On torch 2.13 DCP's ``FileSystemReader`` reads
``.metadata`` with plain ``pickle.load`` and its ``DefaultLoadPlanner`` reads every non-tensor
value (optimizer hyper-parameters) with ``torch.load(weights_only=False)``; tensors themselves
use ``weights_only=True``. :class:`SafeReader` unpickles ``.metadata`` with an allow-list (DCP's
metadata classes, ``torch.Size``, dtypes, paths) and :class:`SafePlanner` loads non-tensor values
with ``weights_only=True``, so a tampered checkpoint fails with a CheckpointError instead of
running code. Plain counters live in kiln.json, tensors in DCP.

A damaged or tampered checkpoint (:func:`verify_checkpoint`: unparseable kiln.json,
``.metadata`` unreadable or asking for a refused global, a shard missing or shorter than the
metadata says) raises a CheckpointError naming the file and the newest older checkpoint that is
intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from kiln.errors import CheckpointError

META = "kiln.json"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


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
        return f"{META} does not parse ({first_line(exc)})"
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
        return f".metadata is unreadable ({first_line(exc)})"
    except Exception as exc:  # EOFError, ValueError, ... from a truncated pickle
        return f".metadata is unreadable or truncated ({type(exc).__name__}: {first_line(exc)})"
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
    with quiet_single_process():
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), no_dist=True)
    return state


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns when used without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
