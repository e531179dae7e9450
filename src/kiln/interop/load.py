"""Load anything ``kiln convert`` accepts into a Kiln GPT + Tokenizer, and convert between them.

Sources: a Hugging Face folder (config.json present), a ``.gguf`` file, or a Kiln run /
checkpoint directory. Destinations: a Hugging Face folder, or a Kiln run directory laid out as
``DST/tokenizer.json`` + ``DST/checkpoints/step-0000000/`` (a DCP checkpoint written by
kiln.train.checkpoint, with ``model_shape`` in kiln.json) that ``kiln generate`` / ``kiln eval``
load like any trained run. A destination that exists and is not empty is never touched; the
output is built in a temporary sibling and renamed into place when complete.

A source may come without a tokenizer (``model.save_pretrained()`` of a training output writes
only config.json + weights): its weights still convert, ``--tokenizer PATH`` attaches one, and a
run left without one loads for conversion but ``generate``/``eval`` say how to attach it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.models.gpt import GPT, GPTConfig
from kiln.train.load import LoadedModel, missing_tokenizer


def source_kind(path: str | Path) -> str:
    """'gguf', 'hf' or 'kiln' for an existing path; KilnError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise KilnError(f"{p} does not exist; give a Hugging Face folder, a .gguf file or a run.")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise KilnError(f"{p} is a file but not a GGUF file (no 'GGUF' magic).")
    if (p / "config.json").is_file():
        return "hf"
    return "kiln"


def build_model(cfg: GPTConfig, sd: dict[str, torch.Tensor], device: str = "cpu") -> GPT:
    """A GPT in eval mode holding ``sd`` (fp32); RoPE tables computed by init_weights."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise KilnError(
            f"converted weights do not fit the shape ({str(e).splitlines()[0]})."
        ) from e
    return model.eval()


def check_vocab(tokenizer, cfg: GPTConfig, source: str | Path) -> None:
    """The tokenizer may not produce ids beyond the embedding (Tokenizer may append EOS)."""
    n = tokenizer.vocab_size
    if tokenizer.eos_id == n - 1 and n - 1 >= cfg.vocab_size:
        n -= 1  # <|endoftext|> appended by kiln's Tokenizer wrapper; never fed to the model
    if n > cfg.vocab_size:
        raise KilnError(
            f"the tokenizer of {source} has {n} tokens but the model's embedding has only "
            f"{cfg.vocab_size} rows; tokenizer and weights do not belong together."
        )


def _hf_tokenizer(folder: Path):
    """The tokenizer a Hugging Face folder holds, or None for a weights-only folder."""
    from kiln.data.tokenizer import _GPT2_PAIRS, Tokenizer

    names = [("tokenizer.json",), *_GPT2_PAIRS]
    if any(all((folder / n).is_file() for n in pair) for pair in names):
        return Tokenizer.load(folder)
    return None


def load_any(
    path: str | Path, device: str = "cpu", tokenizer: str | Path | None = None,
    need_tokenizer: bool = True,
) -> LoadedModel:  # fmt: skip
    """A Kiln GPT (eval mode, fp32) + Tokenizer from a HF folder, a GGUF file or a Kiln run.

    ``tokenizer`` (a folder, a tokenizer.json, or a folder of GPT-2 vocab.json + merges.txt)
    replaces the source's own. Without either, ``need_tokenizer`` decides between a
    KilnError saying how to attach one and a LoadedModel whose tokenizer is None."""
    from kiln.data.tokenizer import Tokenizer

    p = Path(path).expanduser()
    kind = source_kind(p)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else None
    if kind == "kiln":
        from kiln.train.load import load_kiln

        loaded = load_kiln(p, device, need_tokenizer=need_tokenizer and tok is None)
        if tok is not None:
            loaded.tokenizer = tok
        if loaded.tokenizer is not None:
            check_vocab(loaded.tokenizer, loaded.shape, tokenizer or p)
        return loaded
    if kind == "gguf":
        from kiln.interop.gguf import load_gguf_state

        cfg, sd, own = load_gguf_state(p)
    else:
        from kiln.interop.hf import load_hf_state

        own = None if tok is not None else _hf_tokenizer(p)
        if own is None and tok is None and need_tokenizer:
            raise missing_tokenizer(p)
        cfg, sd = load_hf_state(p)
    tok = own if tok is None else tok
    if tok is not None:
        check_vocab(tok, cfg, tokenizer or p)
    model = build_model(cfg, sd, device)
    meta = {"model_shape": dataclasses.asdict(cfg), "source": str(p), "source_kind": kind}
    return LoadedModel(model, tok, cfg, p, meta)


def _fresh_destination(dst: Path) -> Path:
    """A temp dir beside ``dst``; KilnError if ``dst`` already holds something."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise KilnError(f"destination {dst} already exists and is not empty; choose a new path.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))


def _publish(tmp: Path, dst: Path) -> None:
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    os.replace(tmp, dst)


def save_kiln(loaded: LoadedModel, dst: Path, source: str) -> None:
    """Write a Kiln run directory (tokenizer.json + checkpoints/step-0000000) at ``dst``."""
    from kiln.train import checkpoint as ckpt

    dst = Path(dst)
    tmp = _fresh_destination(dst)
    try:
        if loaded.tokenizer is not None:
            loaded.tokenizer.save(tmp)
        meta = {"model_shape": dataclasses.asdict(loaded.shape), "converted_from": source,
                "tokens": 0}  # fmt: skip
        # No optimizer: an empty list gives DCP an empty optimizer state (as load_checkpoint).
        ckpt.save_checkpoint(tmp / "checkpoints", 0, loaded.model, [], meta, keep=1)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf(loaded: LoadedModel, dst: Path, dtype: str = "float32") -> None:
    from kiln.interop.hf import export_arch, write_hf

    export_arch(loaded.shape)  # fail before creating anything
    dst = Path(dst)
    tmp = _fresh_destination(dst)
    try:
        sd = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
        write_hf(tmp, loaded.shape, sd, loaded.tokenizer, dtype)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(
    src: str | Path, dst: str | Path, to: str = "auto", dtype: str = "float32",
    tokenizer: str | Path | None = None,
) -> str:  # fmt: skip
    """Convert ``src`` to ``dst``; ``to`` is 'hf', 'kiln' or 'auto' (Kiln → HF, else → Kiln);
    ``tokenizer`` attaches (or replaces) the tokenizer. Returns a one-line summary."""
    from kiln.interop.hf import DTYPES

    if to not in ("hf", "kiln", "auto"):
        raise KilnError(f"--to is {to!r} but must be hf, kiln or auto.")
    if dtype not in DTYPES:
        raise KilnError(f"--dtype is {dtype!r} but must be one of {', '.join(DTYPES)}.")
    kind = source_kind(src)
    if to == "auto":
        to = "hf" if kind == "kiln" else "kiln"
    loaded = load_any(src, tokenizer=tokenizer, need_tokenizer=False)
    if to == "hf":
        save_hf(loaded, Path(dst).expanduser(), dtype)
    else:
        save_kiln(loaded, Path(dst).expanduser(), str(src))
    n = sum(p.numel() for p in loaded.model.parameters())
    note = (
        ""
        if loaded.tokenizer is not None
        else "; weights only, no tokenizer: add --tokenizer PATH for one"
    )
    return f"converted {kind} {src} → {to} {dst} ({n / 1e6:.2f}M parameters{note})"
