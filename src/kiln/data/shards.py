"""Token shards: tokenise a corpus once, cache it by content hash, memory-map it afterwards.

Layout under the cache root (``DataConfig.cache_dir``, ``$KILN_CACHE`` or ``~/.cache/kiln/data``)::

    <root>/<key>/manifest.json      what is below, with sizes and sha256 of every shard
    <root>/<key>/tokenizer.json     the tokenizer the shards were made with
    <root>/<key>/train-00000.bin    raw little-endian uint16 (vocab < 65536) or uint32 tokens
    <root>/<key>/val-00000.bin

``key = sha256(format version, corpus texts, tokenizer.json, split settings)``, so a changed
corpus, vocabulary or split makes a new directory and an unchanged one is reused. A cache
directory is written under a temporary name and renamed into place when complete, so a crash
never leaves a half-written cache. Every document is followed by ``<|endoftext|>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import DataConfig
from kiln.data.corpus import Document, load_documents
from kiln.data.tokenizer import Tokenizer, build_tokenizer, cache_root, corpus_hash
from kiln.errors import DataError

FORMAT_VERSION = 1
"""Bump when the shard layout or split rule changes."""
SHARD_TOKENS = 1 << 28
"""Most tokens per shard file (512 MiB of uint16); our corpora fit in one."""
MAX_VAL_SHARE = 0.10
"""Validation is cut back (whole documents, then tokens) to at most max(this, val_fraction)."""


@dataclass
class PreparedData:
    """Everything the trainer needs from the data step."""

    tokenizer: Tokenizer
    train: np.ndarray
    """Training tokens, 1-D (a read-only memmap when the split is one shard)."""
    val: np.ndarray
    """Validation tokens, 1-D."""
    manifest: dict[str, Any]
    cache_dir: Path
    """The ``<root>/<key>`` directory holding the shards."""
    reused: bool
    """True when the shards came from the cache (nothing was tokenised)."""


def prepare_data(cfg: DataConfig, log=print) -> PreparedData:
    """Load the corpus, build the tokenizer, and tokenise into (or reuse) cached shards."""
    docs = load_documents(cfg.corpus)
    tok = build_tokenizer(cfg, docs, log=log)
    chash = corpus_hash(docs)
    key = _cache_key(chash, tok, cfg)
    directory = cache_root(cfg) / key
    reused = (directory / "manifest.json").is_file()
    if reused:
        log(f"data: reusing token shards in {directory}")
    else:
        log(f"data: tokenising {len(docs)} documents into {directory}")
        _write_cache(directory, docs, tok, cfg, chash)
    manifest = _read_manifest(directory)
    train, val = (load_split(directory, manifest, s) for s in ("train", "val"))
    if reused:
        tok = Tokenizer.load(directory / "tokenizer.json")
    log(
        f"data: {manifest['splits']['train']['n_tokens']:,} train / "
        f"{manifest['splits']['val']['n_tokens']:,} val tokens, vocab {manifest['vocab_size']}"
    )
    return PreparedData(tok, train, val, manifest, directory, reused)


def _cache_key(chash: str, tok: Tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for part in (f"kiln-shards-v{FORMAT_VERSION}", chash, tok.to_json(), repr(cfg.val_fraction)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# --- writing -------------------------------------------------------------------------------


def split_documents(
    doc_tokens: list[np.ndarray], val_fraction: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, val, n_val_documents): the last ceil(val_fraction × n_docs) documents are val.

    Validation is kept non-empty and at most max(MAX_VAL_SHARE, val_fraction) of the tokens by
    dropping documents from its front; with one document, or when even the last document is
    too big, the split is by tokens instead (n_val_documents = 0).
    """
    total = sum(len(t) for t in doc_tokens)
    cap = max(MAX_VAL_SHARE, val_fraction) * total
    n_val = min(math.ceil(val_fraction * len(doc_tokens)), len(doc_tokens) - 1)
    while n_val > 1 and sum(len(t) for t in doc_tokens[-n_val:]) > cap:
        n_val -= 1
    if n_val >= 1 and sum(len(t) for t in doc_tokens[-n_val:]) <= cap:
        return (
            np.concatenate(doc_tokens[:-n_val]),
            np.concatenate(doc_tokens[-n_val:]),
            n_val,
        )
    everything = np.concatenate(doc_tokens)
    n_val_tokens = min(max(1, math.ceil(val_fraction * total)), total - 1)
    if n_val_tokens < 1:
        raise DataError(f"corpus has {total} tokens, too few to split into train and val.")
    return everything[:-n_val_tokens], everything[-n_val_tokens:], 0


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -Σ p log p (nats) of the token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _write_cache(
    directory: Path, docs: list[Document], tok: Tokenizer, cfg: DataConfig, chash: str
) -> None:
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    eos = np.array([tok.eos_id], dtype=dtype)
    doc_tokens = [
        np.concatenate([np.asarray(ids, dtype=dtype), eos])
        for ids in tok.encode_batch([d.text for d in docs])
    ]
    train, val, n_val_docs = split_documents(doc_tokens, cfg.val_fraction)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name[:16]}-"))
    try:
        shards = _write_split(tmp, "train", train) + _write_split(tmp, "val", val)
        tok.save(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": directory.name,
            "source": cfg.corpus,
            "tokenizer_source": cfg.tokenizer,
            "corpus_sha256": chash,
            "n_documents": len(docs),
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "val_fraction": cfg.val_fraction,
            "splits": {
                "train": {"n_tokens": int(len(train)), "n_documents": len(docs) - n_val_docs},
                "val": {"n_tokens": int(len(val)), "n_documents": n_val_docs},
            },
            "split_by": "documents" if n_val_docs else "tokens",
            "val_unigram_entropy_nats": unigram_entropy(val, tok.vocab_size),
            "shards": shards,
        }
        _write_file(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "manifest.json").is_file():  # not a concurrent twin: a real error
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_split(directory: Path, split: str, tokens: np.ndarray) -> list[dict[str, Any]]:
    shards = []
    for i, start in enumerate(range(0, len(tokens), SHARD_TOKENS)):
        part = np.ascontiguousarray(tokens[start : start + SHARD_TOKENS])
        data = part.astype(part.dtype.newbyteorder("<"), copy=False).tobytes()
        name = f"{split}-{i:05d}.bin"
        _write_file(directory / name, data)
        shards.append(
            {
                "split": split,
                "file": name,
                "n_tokens": int(len(part)),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return shards


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- reading -------------------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"token cache manifest {str(path)!r} is unreadable; delete {directory} to rebuild."
        ) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"token cache {str(directory)!r} has format {manifest.get('format_version')} but "
            f"this kiln reads format {FORMAT_VERSION}; delete it to rebuild."
        )
    return manifest


def load_split(directory: Path, manifest: dict[str, Any], split: str) -> np.ndarray:
    """Verify (size and sha256) and memory-map one split's shards, concatenated if several."""
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    parts = []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        path = directory / shard["file"]
        _verify_shard(path, shard, directory)
        if shard["n_tokens"]:
            parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["n_tokens"],)))
    if not parts:
        raise DataError(
            f"token cache {str(directory)!r} has no {split} shard; delete it to rebuild."
        )
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _verify_shard(path: Path, shard: dict[str, Any], directory: Path) -> None:
    expected = shard["bytes"]
    found = path.stat().st_size if path.is_file() else 0
    ok = found == expected
    if ok and expected:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            ok = hashlib.sha256(m).hexdigest() == shard["sha256"]
    if not ok:
        raise DataError(
            f"token shard {shard['file']} is corrupt or truncated (expected {expected} bytes, "
            f"found {found}); delete {directory} to rebuild."
        )
