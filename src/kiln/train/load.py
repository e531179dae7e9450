"""Load a trained Kiln model (run directory or checkpoint directory) for sampling, eval, export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import CheckpointError
from kiln.models.gpt import GPT, GPTConfig
from kiln.train import checkpoint as ckpt


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: object  # kiln.data.tokenizer.Tokenizer
    shape: GPTConfig
    checkpoint: Path
    meta: dict


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a run directory or one of its step-* directories."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run directory or a checkpoint.")
    if ckpt.STEP_DIR.match(path.name):
        ckpt.verify_checkpoint(path)  # raises if incomplete, damaged or tampered
        return path, path.parent.parent
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (looked in {path}/checkpoints)."
        )
    ckpt.verify_checkpoint(latest)
    return latest, path


def load_kiln(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    from kiln.data.tokenizer import Tokenizer

    checkpoint, run_dir = resolve_checkpoint(path)
    meta = ckpt.read_meta(checkpoint)
    shape = GPTConfig(**meta["model_shape"])
    with torch.device("meta"):
        model = GPT(shape)
    model.to_empty(device=device)
    model.init_weights()  # buffers (RoPE tables); parameters are overwritten by the checkpoint
    ckpt.load_checkpoint(checkpoint, model, None)
    model.eval()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer.json next to its checkpoints.")
    return LoadedModel(model, Tokenizer.load(tok_path), shape, checkpoint, meta)


def generate_text(
    path: str,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    device: str = "auto",
) -> list[str]:
    from kiln.models.generate import generate

    dev = (
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    loaded = load_kiln(path, dev)
    tok = loaded.tokenizer
    ids = tok.encode(prompt) if prompt else [tok.eos_id]
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    out = generate(
        loaded.model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
    start = 0 if prompt else 1
    return [tok.decode(row[start:].tolist()) for row in out]
