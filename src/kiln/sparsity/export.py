"""Export the sparsity masks of a checkpoint to a safetensors file.

The weights themselves need nothing special: a sparse run's checkpoint holds ordinary dense
matrices with exact zeros, so ``kiln convert`` (or any loader) reads them like any other run.
The masks say which zeros are structural (kept out by the mask) rather than incidental; they
live in the checkpoint as ``extra.cb.sparsity.mask.<parameter name>`` and are written here as
uint8 tensors (1 = kept) named by parameter, with the pattern in the file's metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kiln.errors import CheckpointError, KilnError

PREFIX = "extra.cb.sparsity.mask."


def read_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} from a run directory or step-* checkpoint directory."""
    from kiln.train.checkpoint import read_tensors
    from kiln.train.load import resolve_checkpoint

    checkpoint, _ = resolve_checkpoint(path)
    masks = {
        name[len(PREFIX) :]: t.to(torch.bool)
        for name, t in read_tensors(checkpoint).items()
        if name.startswith(PREFIX)
    }
    if not masks:
        raise CheckpointError(f"{checkpoint} holds no sparsity masks (was it a sparse run?).")
    return masks


def export_masks(path: str | Path, out: str | Path) -> str:
    """Write the masks of ``path``'s newest checkpoint to ``out`` (.safetensors, must not
    exist); return a one-line summary."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise KilnError(f"{out} must end in .safetensors.")
    if out.exists():
        raise KilnError(f"{out} already exists; choose a new file name.")
    masks = read_masks(path)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    tensors = {name: m.to(torch.uint8).contiguous() for name, m in masks.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "kiln-sparsity-masks", "kept": "1"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return f"wrote {len(masks)} masks ({1 - kept / total:.4f} sparse overall) to {out}"
