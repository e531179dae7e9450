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


def missing_tokenizer(path: str | Path) -> CheckpointError:
    """The one sentence for a model that has weights but no tokenizer (a weights-only import)."""
    return CheckpointError(
        f"{path} has no tokenizer, so text cannot be turned into tokens for it; attach one with "
        "'kiln convert SOURCE NEW_DIR --tokenizer PATH' (a folder, a tokenizer.json, or GPT-2 "
        f"vocab.json + merges.txt) or copy a tokenizer.json into {path}."
    )


def load_kiln(
    path: str | Path, device: str | torch.device = "cpu", need_tokenizer: bool = True
) -> LoadedModel:
    """Model + tokenizer of a run; ``need_tokenizer=False`` gives ``tokenizer=None`` for a run
    converted without one (``kiln convert`` of weights only) instead of an error."""
    from kiln.data.tokenizer import Tokenizer

    checkpoint, run_dir = resolve_checkpoint(path)
    tok_path = run_dir / "tokenizer.json"
    if need_tokenizer and not tok_path.is_file():
        raise missing_tokenizer(run_dir)
    meta = ckpt.read_meta(checkpoint)
    shape = GPTConfig(**meta["model_shape"])
    with torch.device("meta"):
        model = GPT(shape)
    model.to_empty(device=device)
    model.init_weights()  # buffers (RoPE tables); parameters are overwritten by the checkpoint
    ckpt.load_checkpoint(checkpoint, model, None)
    model.eval()
    tok = Tokenizer.load(tok_path) if tok_path.is_file() else None
    return LoadedModel(model, tok, shape, checkpoint, meta)


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
