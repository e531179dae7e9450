"""One registry of the stateful parts a checkpoint saves and a resume restores.

Every part follows torch.distributed.checkpoint's ``Stateful`` protocol (``state_dict()`` /
``load_state_dict()``) and is registered once, under a name and with the places its state lives
in a checkpoint: tensors (and anything else that must not go through JSON) in DCP's shards,
plain values in kiln.json. Saving and restoring walk the same registry, so a new resumable piece
(an MoE expert bias, a callback) is one :meth:`TrainingState.register` call and nothing else.

The default places keep the layout Kiln checkpoints have always had, so older ones still load:

============================  ===============================  ==========================
part                          DCP shards                       kiln.json
============================  ===============================  ==========================
model parts + optimizer(s)    ``model.<fqn>``, ``optim.*``     —
CPU RNG                       ``extra.rng_cpu``                —
callback ``NAME``             ``extra.cb.NAME.*`` (tensors)    ``callbacks.NAME`` (rest)
trainer counters, loader,     —                                ``trainer``, ``loader``,
LR schedule                                                    ``schedule``
============================  ===============================  ==========================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from kiln.errors import CheckpointError
from kiln.train import checkpoint as ckpt
from kiln.train.callbacks import split_state

if TYPE_CHECKING:
    from kiln.config import JobConfig
    from kiln.distributed.parallel_dims import ParallelDims
    from kiln.train.trainer import Trainer

Where = tuple[str, ...]
"""A path of keys into the (nested) DCP state or kiln.json; ``()`` is the top level."""


class ModelParts:
    """The model parts this rank holds (one per pipeline stage) with their optimizer(s), as one
    Stateful. One part, not two: the optimizer state is keyed by the model's parameter names,
    and DCP's ``get_state_dict``/``set_state_dict`` read and write both together, so a checkpoint
    of any layout reloads into any other."""

    def __init__(self, parts: Iterable[nn.Module], optimizer) -> None:
        self.parts, self.optimizer = list(parts), optimizer

    def state_dict(self) -> dict[str, Any]:
        return ckpt.tensor_state(self.parts, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.set_tensor_state(self.parts, self.optimizer, state)


class CPURng:
    """The CPU random generator (dropout, sampling): restored so a resumed run draws the same
    numbers as an uninterrupted one."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng_cpu": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["rng_cpu"])


@dataclass
class _Entry:
    part: Stateful
    dcp: Where | None
    """Where its tensors go in the DCP state (everything, when ``json`` is None)."""
    json: Where | None
    """Where its plain values go in kiln.json (everything, when ``dcp`` is None)."""

    def split(self, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what goes to DCP, what goes to kiln.json) of one ``state_dict()``."""
        if self.json is None:
            return state, {}
        tensors, plain = split_state(state)
        if self.dcp is None and tensors:
            raise ValueError(f"a part stored in kiln.json only has tensors: {sorted(tensors)}")
        return tensors, plain


class TrainingState:
    """The registry: name → Stateful part, and where each keeps its state in a checkpoint."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def register(
        self, name: str, part: Stateful, *, dcp: Where | None = ..., json: Where | None = ...
    ) -> None:
        """Add ``part``. By default its tensors go to ``extra.NAME`` in DCP's shards and its
        plain values to ``NAME`` in kiln.json; ``dcp=None``/``json=None`` keep it all in one."""
        if not isinstance(part, Stateful):
            raise TypeError(f"{name}: {type(part).__name__} has no state_dict/load_state_dict")
        if name in self.entries:
            raise ValueError(f"a stateful part named {name!r} is already registered")
        dcp = ("extra", name) if dcp is ... else dcp
        json = (name,) if json is ... else json
        if dcp is None and json is None:
            raise ValueError(f"{name}: its state must go somewhere (dcp or json)")
        self.entries[name] = _Entry(part, dcp, json)

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(DCP state, kiln.json values) of every part, each ``state_dict()`` called once, in
        registration order."""
        tensors: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        for entry in self.entries.values():
            to_dcp, to_json = entry.split(entry.part.state_dict())
            if entry.dcp is not None and to_dcp:
                _place(tensors, entry.dcp, to_dcp)
            if entry.json is not None:
                _place(plain, entry.json, to_json)
        return tensors, plain

    def save(self, root: Path, step: int, keep: int, facts: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` under ``root`` (all ranks call this); ``facts`` are the
        run's own kiln.json fields (model shape, config hash, ...), stored beside the parts."""
        tensors, plain = self.snapshot()
        return ckpt.write_checkpoint(root, step, tensors, {**facts, **plain}, keep=keep)

    def restore(self, path: Path, verified: bool = False) -> dict[str, Any]:
        """Load checkpoint ``path`` into every part (in registration order) and return its
        kiln.json. A damaged checkpoint (unless ``verified`` just now), or one that holds
        nothing for a registered part, is refused before anything loads."""
        if not verified:
            ckpt.verify_checkpoint(path)
        meta = ckpt.read_meta(path)
        stored = ckpt.stored_keys(path)
        templates: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        tensors: dict[str, Any] = {}
        for name, entry in self.entries.items():
            to_dcp, _ = entry.split(entry.part.state_dict())  # current tensors are the templates
            missing = _missing(entry, to_dcp, meta, stored)
            if missing is not None:
                raise CheckpointError(
                    f"Checkpoint {path} holds no state for this run's {name!r} ({missing} is "
                    "missing); resume it with the config it was trained with."
                )
            if entry.dcp is not None and to_dcp:
                _place(tensors, entry.dcp, to_dcp)
            plain = _at(meta, entry.json) if entry.json is not None else {}
            templates[name] = (to_dcp, plain)
        ckpt.read_checkpoint(path, tensors, verified=True)
        for name, entry in self.entries.items():
            to_dcp, plain = templates[name]
            loaded = _at(tensors, entry.dcp) if entry.dcp is not None and to_dcp else {}
            entry.part.load_state_dict({**{k: loaded[k] for k in to_dcp}, **plain})
        return meta


# -- the parts of a Kiln run ----------------------------------------------------------------


def training_state(model_parts: list, optimizer, trainer: Trainer) -> TrainingState:
    """Every stateful part of a run, registered once: checkpoints save and resumes restore
    exactly these (see kiln.train.state for where each lives on disk)."""
    state = TrainingState()
    state.register("model", ModelParts(model_parts, optimizer), dcp=(), json=None)
    state.register("rng", CPURng(), dcp=("extra",), json=None)
    for cb in trainer.callbacks:  # tensors in extra.cb.NAME, the rest in callbacks.NAME
        state.register(f"cb.{cb.name}", cb, json=("callbacks", cb.name))
    state.register("trainer", trainer.state)
    state.register("loader", trainer.loader)
    # warm-up, peak and floor as saved; the total follows the (possibly extended) plan
    state.register("schedule", trainer.schedule)
    return state


def checkpoint_saver(state: TrainingState, trainer: Trainer, root: Path, keep: int, facts):
    """The trainer's save hook: every registered part at the trainer's step, with the run's
    facts and its token count in kiln.json."""

    def save() -> None:
        state.save(root, trainer.state.step, keep, {**facts, "tokens": trainer.state.tokens})

    return save


def run_facts(job: JobConfig, shape_dict: dict, dims: ParallelDims) -> dict[str, Any]:
    """kiln.json fields that describe the run rather than restore a part."""
    return {
        "config_hash": ckpt.config_hash({k: v for k, v in job.to_dict().items() if k != "run"}),
        "model_shape": shape_dict,
        "world_size": dims.world_size,
        "layout": dims.degrees,
    }


def restore_run(latest, shape_dict, state: TrainingState, trainer: Trainer, log) -> None:
    """Load every registered part from checkpoint ``latest`` (refused unless it was saved for
    this model shape)."""
    ckpt.verify_checkpoint(latest)  # a damaged one is named before anything else reads it
    meta = ckpt.read_meta(latest)
    if not same_model_shape(meta.get("model_shape"), shape_dict):
        raise CheckpointError(
            f"Checkpoint {latest} was saved for a different model shape; resume it with the "
            "config it was trained with."
        )
    state.restore(latest, verified=True)
    log(f"resumed from {latest} (step {trainer.state.step}, {trainer.state.tokens:,} tokens)")


def same_model_shape(saved: dict | None, shape_dict: dict) -> bool:
    """Whether a checkpoint's model_shape is this shape; fields added to GPTConfig since the
    checkpoint was written (e.g. qk_norm) count with their defaults."""
    from kiln.models.gpt import GPTConfig

    try:
        return dataclasses.asdict(GPTConfig(**saved)) == shape_dict
    except TypeError:  # not a dict, or a field this version does not know
        return False


def _place(tree: dict[str, Any], where: Where, values: dict[str, Any]) -> None:
    """Merge ``values`` into ``tree`` at ``where``; two parts may not claim one key."""
    node = tree
    for key in where:
        node = node.setdefault(key, {})
    clash = node.keys() & values.keys()
    if clash:
        raise ValueError(f"two stateful parts store {'.'.join((*where, min(clash)))}")
    node.update(values)


def _at(tree: dict[str, Any], where: Where) -> Any:
    for key in where:
        tree = tree[key]
    return tree


def _missing(entry: _Entry, to_dcp: dict[str, Any], meta: dict, stored: set[str]) -> str | None:
    """The first place a checkpoint should hold ``entry``'s state but does not (None: all
    there). Within a place, which tensors match is for DCP's load to judge."""
    if entry.json is not None:
        node = meta
        for depth, key in enumerate(entry.json):
            if not isinstance(node, dict) or key not in node:
                return f"{'.'.join(entry.json[: depth + 1])} in {ckpt.META}"
            node = node[key]
    if entry.dcp is None:
        return None
    for key in to_dcp:
        name = ".".join((*entry.dcp, key))
        if name not in stored and not any(s.startswith(name + ".") for s in stored):
            return f"{name} in its tensors"
    return None
