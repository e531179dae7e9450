"""Allocate a layout's shards on a rank and initialise them to the values the whole model gets
from the same seed — without ever holding the whole model.

The model is built on the ``meta`` device (no memory), cut into pipeline stages and sharded
(TP, EP, FSDP2) there; :func:`materialize` then allocates each rank's own shards
(``to_empty``) and walks the WHOLE model's initialisation units (embeddings, each block, norm,
head: :meth:`GPT.init_units`) in order from ``torch.manual_seed(seed)``. Each unit is built whole
on its own, initialised by its own ``init_weights``, and the slice this rank holds is copied out
(a DTensor's local shard is cut by its placements, as ``distribute_tensor`` cuts it); then the
unit is freed. So a rank's build holds its shards plus one unit at a time, and every layout —
one process, TP, PP, FSDP2 and their products — starts from the same numbers, equal bit for bit
to ``GPT.init_weights`` on one process (the RNG stream is consumed the same way)."""

from __future__ import annotations

import copy
from itertools import chain

import torch
from torch import nn

from kiln.models.gpt import GPT, GPTConfig
from kiln.sparsity.masks import canonical


def meta_model(shape: GPTConfig) -> GPT:
    """The whole model on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return GPT(shape)


def _copy_shard(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy into ``target`` (a plain tensor, or a DTensor's local shard) its part of ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds ``full`` and cuts its own shard, no messages
        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        full, target = shard.to_local(), target.to_local()
    target.copy_(full)


@torch.no_grad()
def materialize(parts: list[nn.Module], device: torch.device, seed: int) -> None:
    """Allocate ``parts`` (this rank's pipeline stages of one GPT, built on meta and already
    sharded) on ``device`` and initialise them as the whole model is initialised from ``seed``."""
    for part in parts:
        part.to_empty(device=device)
    local: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for name, t in chain(part.named_parameters(), part.named_buffers()):
            local.setdefault(canonical(name), []).append(t)
    whole = meta_model(parts[0].config)
    torch.manual_seed(seed)
    for prefix, unit, init in whole.init_units():
        built = copy.deepcopy(unit).to_empty(device=device)
        init(built)  # every rank draws every unit: the RNG stream is the whole model's
        for name, full in chain(built.named_parameters(prefix), built.named_buffers(prefix)):
            for target in local.pop(name, []):
                _copy_shard(target, full)
        del built
    for part in parts:
        part.init_buffers()
    own = {name for name, _ in whole.named_buffers(recurse=False)}
    missed = sorted(set(local) - own)
    if missed:
        raise RuntimeError(f"no initialisation unit covers {', '.join(missed)}")
