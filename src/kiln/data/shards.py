"""Token shards on disk, and the read-only views the loader takes windows from.

A prepared corpus lives in ``<cache root>/<key>/`` (see :mod:`kiln.data.prepare` for how it is
written and keyed)::

    manifest.json          what is below: shards, sizes, sha256, splits, skipped documents
    tokenizer.json         the tokenizer the shards were made with
    tokens-00000.bin       raw little-endian uint16 (vocab < 65536) or uint32 tokens
    docs-00000.bin         the index of document boundaries: each document's token count
                           (its <|endoftext|> included), little-endian uint32

The shards of a corpus are one token stream, in corpus order, every document followed by
``<|endoftext|>``. The splits are ranges of that stream (``manifest["splits"]``: ``start``,
``stop``): validation is the last documents. :class:`TokenView` shows a range, or a list of
ranges of several corpora (a mixture), as one 1-D array without reading it: indexing reads only
the tokens asked for, so each data-parallel rank pages in only its own windows.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import DataError

FORMAT_VERSION = 2
"""Bump when the shard layout or split rule changes."""
MAX_VAL_SHARE = 0.10
"""Validation is cut back (whole documents, then tokens) to at most max(this, val_fraction)."""
VERIFY_SHA_BYTES = 2 << 30
"""Caches up to this size are verified by sha256 at every load; larger ones by size only
(``kiln data prepare --verify`` checks every byte of any size)."""


class TokenView:
    """A read-only 1-D token array made of ranges of memory-mapped shards, never loaded whole.

    ``view[i]``, ``view[a:b]`` and ``view[index_array]`` (any shape) read only those tokens;
    ``np.asarray(view)`` materialises it (small data only).
    """

    def __init__(self, parts: list[tuple[np.ndarray, int, int]]) -> None:
        self.parts = [(a, int(s), int(e)) for a, s, e in parts if e > s]
        """(memmap, start, stop) ranges, in order."""
        lengths = [e - s for _, s, e in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.dtype = self.parts[0][0].dtype if self.parts else np.dtype("<u2")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def ranges(self, start: int, stop: int) -> list[tuple[np.ndarray, int, int]]:
        """The (memmap, start, stop) parts covering tokens [start, stop) of this view."""
        out = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.parts)):
            arr, s, e = self.parts[i]
            off = int(self.offsets[i])
            if off >= stop:
                break
            lo, hi = max(start, off), min(stop, off + e - s)
            if hi > lo:
                out.append((arr, s + lo - off, s + hi - off))
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            chunks = [np.asarray(a[s:e]) for a, s, e in self.ranges(start, stop)]
            return np.concatenate(chunks) if chunks else np.empty(0, self.dtype)
        if np.isscalar(key):
            i = int(key) + (len(self) if int(key) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} is outside a view of {len(self)} tokens")
            ((arr, s, _),) = self.ranges(i, i + 1)
            return arr[s]
        idx = np.asarray(key, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index outside a view of {len(self)} tokens")
        out = np.empty(flat.shape, dtype=self.dtype)
        part = np.searchsorted(self.offsets, flat, side="right") - 1
        for p in np.unique(part):
            arr, s, _ = self.parts[p]
            mask = part == p
            out[mask] = arr[flat[mask] - self.offsets[p] + s]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype)

    def blocks(self, size: int = 1 << 22):
        """The tokens in order, ``size`` at a time (bounded memory)."""
        for start in range(0, len(self), size):
            yield self[start : start + size]


# --- reading a prepared corpus -------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any]:
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


def open_stream(directory: Path, manifest: dict[str, Any], verify: bool | None = None):
    """The whole token stream of a prepared corpus as a :class:`TokenView`, its shards checked
    by size and, when ``verify`` (default: caches up to ``VERIFY_SHA_BYTES``), by sha256."""
    total = sum(s["bytes"] for s in manifest["shards"])
    verify = total <= VERIFY_SHA_BYTES if verify is None else verify
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    parts = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        _verify_shard(path, shard, directory, verify)
        if shard["n_tokens"]:
            arr = np.memmap(path, dtype=dtype, mode="r", shape=(shard["n_tokens"],))
            parts.append((arr, 0, shard["n_tokens"]))
    return TokenView(parts)


def split_view(stream: TokenView, manifest: dict[str, Any], split: str) -> TokenView:
    """One split (``train`` or ``val``) of a corpus's token stream."""
    sp = manifest["splits"][split]
    return TokenView(stream.ranges(sp["start"], sp["stop"]))


def doc_lengths(directory: Path, shard: dict[str, Any]) -> np.ndarray:
    """Token counts of one shard's documents (``<|endoftext|>`` included)."""
    return np.fromfile(directory / shard["docs"], dtype="<u4").astype(np.int64)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """sha256 of a file read in blocks (no memory map, so it adds nothing to resident memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _verify_shard(path: Path, shard: dict[str, Any], directory: Path, full: bool) -> None:
    expected = shard["bytes"]
    found = path.stat().st_size if path.is_file() else 0
    ok = found == expected and (not full or not expected or sha256_file(path) == shard["sha256"])
    if not ok:
        raise DataError(
            f"token shard {shard['file']} is corrupt or truncated (expected {expected} bytes, "
            f"found {found}); delete {directory} to rebuild."
        )


# --- statistics and the split rule ---------------------------------------------------------


def unigram_entropy(tokens, vocab_size: int) -> float:
    """H = -Σ p log p (nats) of the token frequencies: the loss of the best context-free model."""
    blocks = tokens.blocks() if isinstance(tokens, TokenView) else [tokens]
    counts = np.zeros(vocab_size, dtype=np.int64)
    for b in blocks:
        counts += np.bincount(np.asarray(b, dtype=np.int64), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def split_documents(
    doc_tokens: list[np.ndarray], val_fraction: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, val, n_val_documents) of documents held in memory: the reference for the
    streaming split (:func:`kiln.data.prepare.split_point`), which must agree with it.

    The last ceil(val_fraction × n_docs) documents are val, kept non-empty and at most
    max(MAX_VAL_SHARE, val_fraction) of the tokens by dropping documents from its front; with
    one document, or when even the last document is too big, the split is by tokens instead
    (n_val_documents = 0).
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
