"""Preparation: stream a corpus into token shards in bounded memory, in parallel, resumably.

The corpus streams through once. Documents are grouped into batches of about 1 MB of text that
worker threads encode (the Hugging Face encoder runs in Rust without the GIL, so the threads use
every core while the main thread reads and decompresses the next batch); results are written
in order into shards of ``DataConfig.shard_mb`` MB of text, each committed (fsync, rename, then
its ``shard-NNNNN.json``) as it completes. At most ``2 × workers`` batches are in flight, so
peak memory depends on the batch and shard size, never on the corpus size.

Keys. Preparation works in ``<root>/.partial-<source key>/``, where the source key hashes what
is read (each file's path, size and modification time; built-ins' text), the tokenizer and the
split settings. A killed preparation started again with the same inputs finds its finished
shards there and only re-reads (does not re-encode) their documents. When the stream ends, the
cache key — sha256 of the corpus text (hashed while streaming, shard by shard), the tokenizer
and the split settings — names the final directory ``<root>/<key>/``, into which the work
directory is renamed, and ``<root>/sources/<source key>.json`` points to it so that the next run
finds it without reading the corpus. A changed file, tokenizer or split makes new keys; nothing
stale is reused, and nothing half-written is ever under a final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import DataConfig
from kiln.data.corpus import Corpus
from kiln.data.lock import preparation_lock
from kiln.data.shards import (
    FORMAT_VERSION,
    MAX_VAL_SHARE,
    doc_lengths,
    open_stream,
    read_manifest,
    split_view,
    unigram_entropy,
)
from kiln.data.tokenizer import Tokenizer, cache_root
from kiln.errors import DataError
from kiln.fsio import atomic_write_json
from kiln.train.faults import crash_point

BATCH_CHARS = 1 << 20
"""Text per encode batch (the unit of parallel work)."""


def workers_for(cfg: DataConfig) -> int:
    """``cfg.workers``, or the cores this process may use."""
    return cfg.workers or len(os.sched_getaffinity(0))


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def prepare_corpus(
    spec: str, tok: Tokenizer, cfg: DataConfig, log=print, progress: bool = False
) -> tuple[Path, bool]:
    """(cache directory, reused) of corpus ``spec`` tokenised with ``tok``: an existing one, or
    one prepared now (continuing a killed preparation of the same inputs). One process at a
    time prepares a given corpus (``kiln.data.lock``); others wait, then reuse its shards."""
    corpus = Corpus(spec, cfg.text_field)
    settings = f"val_fraction={cfg.val_fraction!r} shard_mb={cfg.shard_mb!r}"
    fingerprint = corpus.fingerprint()
    source_key = _sha(f"kiln-source-v{FORMAT_VERSION}", fingerprint, tok.to_json(), settings)
    root = cache_root(cfg)
    pointer = root / "sources" / f"{source_key}.json"
    if found := _prepared(pointer):
        return found, True
    lock = root / ".locks" / f"{source_key[:32]}.lock"
    with preparation_lock(lock, cfg.prepare_timeout_s, f"corpus {spec!r}", log=log):
        if found := _prepared(pointer):  # another process prepared it while we waited
            return found, True
        work = root / f".partial-{source_key[:32]}"
        return _prepare(corpus, tok, cfg, work, pointer, settings, log, progress)


def _prepared(pointer: Path) -> Path | None:
    """The finished cache directory ``pointer`` names, if there is one."""
    if pointer.is_file():
        target = pointer.parent.parent / json.loads(pointer.read_text())["key"]
        if (target / "manifest.json").is_file():
            return target
    return None


def _prepare(
    corpus: Corpus, tok: Tokenizer, cfg: DataConfig, work: Path, pointer: Path, settings: str,
    log, progress: bool,
) -> tuple[Path, bool]:  # fmt: skip
    """Stream ``corpus`` into ``work`` (keeping what a killed run finished), then rename it to
    its content key and point ``pointer`` at it."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        shards, done_before = _stream(corpus, tok, cfg, work, log, progress)
        manifest = _finish(corpus, tok, cfg, work, shards, settings)
    except DataError:  # bad input: leave nothing behind (a kill leaves the shards to resume)
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(_summary(corpus, manifest, shards, done_before, time.perf_counter() - started))
    target = work.parent / manifest["key"]
    if (target / "manifest.json").is_file():  # the same text, prepared from other files
        shutil.rmtree(work)
    else:
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover under the final name
        os.rename(work, target)
    atomic_write_json(pointer, {"key": manifest["key"], "source": corpus.spec})
    return target, False


def _summary(corpus: Corpus, manifest: dict, shards: list, done_before: int, secs: float) -> str:
    text_mb, file_mb = manifest["text_bytes"] / 1e6, corpus.bytes_read / 1e6
    files = f" from {file_mb:,.1f} MB of files" if abs(file_mb - text_mb) > 0.05 * text_mb else ""
    resumed = f", {done_before} of {len(shards)} shards kept from before" if done_before else ""
    skipped = f"; {corpus.skipped_summary()}" if corpus.skipped else ""
    return (
        f"data: prepared {manifest['n_documents']:,} documents ({text_mb:,.1f} MB of text"
        f"{files}) into {manifest['n_tokens']:,} tokens in {secs:.1f} s "
        f"({text_mb / max(secs, 1e-9):.2f} MB/s of text{resumed}){skipped}"
    )


# --- streaming ----------------------------------------------------------------------------


class _Shard:
    """One shard being written: tokens and document lengths appended, then committed."""

    def __init__(self, work: Path, index: int) -> None:
        self.work, self.index = work, index
        self.name = f"tokens-{index:05d}.bin"
        self.docs_name = f"docs-{index:05d}.bin"
        self.meta = work / f"shard-{index:05d}.json"
        self._tok = open(work / f".{self.name}.tmp", "wb")
        self._docs = open(work / f".{self.docs_name}.tmp", "wb")
        self._hash = hashlib.sha256()
        self._text = hashlib.sha256()
        self.n_tokens = self.n_docs = self.text_bytes = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, text_digest: bytes, nbytes: int):
        data = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
        self._tok.write(data)
        self._hash.update(data)
        self._docs.write(lengths.astype("<u4").tobytes())
        self._text.update(text_digest)
        self.n_tokens += len(tokens)
        self.n_docs += len(lengths)
        self.text_bytes += nbytes

    def commit(self) -> dict[str, Any]:
        for f, name in ((self._tok, self.name), (self._docs, self.docs_name)):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.work / f".{name}.tmp", self.work / name)
        info = {
            "file": self.name,
            "docs": self.docs_name,
            "n_tokens": self.n_tokens,
            "n_documents": self.n_docs,
            "bytes": (self.work / self.name).stat().st_size,
            "sha256": self._hash.hexdigest(),
            "text_sha256": self._text.hexdigest(),
            "text_bytes": self.text_bytes,
        }
        atomic_write_json(self.meta, info)
        return info


def _finished_shard(work: Path, index: int) -> dict[str, Any] | None:
    """The record of shard ``index`` if an earlier run committed it (files intact)."""
    meta = work / f"shard-{index:05d}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    ok = (work / info["file"]).is_file() and (work / info["file"]).stat().st_size == info["bytes"]
    return info if ok and (work / info["docs"]).is_file() else None


def _encode(tok: Tokenizer, texts: list[str], dtype) -> tuple:
    tokens, lengths = tok.encode_documents(texts, dtype)
    h = hashlib.sha256()
    nbytes = 0
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        nbytes += len(data)
    return tokens, lengths, h.digest(), nbytes


class _Writer:
    """Writes encoded batches into shards in the order they were submitted, with at most
    ``limit`` batches in flight (the bound on memory)."""

    def __init__(self, work: Path, pool: ThreadPoolExecutor, limit: int, corpus: Corpus, bar):
        self.work, self.pool, self.limit, self.corpus, self.bar = work, pool, limit, corpus, bar
        self.pending: deque[tuple[str, Any]] = deque()  # ("batch", future) | ("commit", index)
        self.shards: list[dict[str, Any]] = []
        self.shard: _Shard | None = None
        self.kept = 0

    def submit(self, *call) -> None:
        self.pending.append(("batch", self.pool.submit(*call)))
        self.drain(self.limit)

    def commit(self, index: int) -> None:
        self.pending.append(("commit", index))

    def keep(self, info: dict[str, Any]) -> None:
        """Take a shard an earlier (killed) run finished, after everything before it."""
        self.drain(0)
        self.shards.append(info)
        self.kept += 1

    def drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            kind, item = self.pending.popleft()
            if kind == "batch":
                self.shard = self.shard or _Shard(self.work, len(self.shards))
                self.shard.add(*item.result())
            else:
                self.shards.append(self.shard.commit())
                self.shard = None
                crash_point(f"data-shard:{item}")
            if self.bar is not None:
                self.bar.update(self.corpus.bytes_read - self.bar.n)


def _stream(
    corpus: Corpus, tok: Tokenizer, cfg: DataConfig, work: Path, log, progress: bool
) -> tuple[list[dict[str, Any]], int]:
    """Encode the corpus into committed shards in ``work``; returns their records and how many
    were already there from a killed run (their documents are read again, not encoded)."""
    dtype = np.dtype(np.uint16 if tok.vocab_size < 65536 else np.uint32)
    shard_chars = max(1, int(cfg.shard_mb * 1e6))
    batch_chars = max(1, min(BATCH_CHARS, shard_chars // 4))
    n_workers = workers_for(cfg)
    bar = _progress_bar(corpus, progress)
    try:
        with ThreadPoolExecutor(n_workers) as pool:
            w = _Writer(work, pool, 2 * n_workers, corpus, bar)
            index, batch, batch_len, shard_len = 0, [], 0, 0
            kept = _finished_shard(work, 0)
            for doc in corpus.documents():
                shard_len += len(doc.text)
                if kept is None:
                    batch.append(doc.text)
                    batch_len += len(doc.text)
                    if batch_len >= batch_chars or shard_len >= shard_chars:
                        w.submit(_encode, tok, batch, dtype)
                        batch, batch_len = [], 0
                if shard_len >= shard_chars:
                    w.commit(index) if kept is None else w.keep(kept)
                    index, shard_len = index + 1, 0
                    kept = _finished_shard(work, index)
            if shard_len and kept is not None:  # the last, partly filled shard
                w.keep(kept)
            elif shard_len:
                if batch:
                    w.submit(_encode, tok, batch, dtype)
                w.commit(index)
            w.drain(0)
    finally:
        if bar is not None:
            bar.close()
    return w.shards, w.kept


def _progress_bar(corpus: Corpus, progress: bool):
    """A tqdm bar over the bytes of the corpus (MB/s, ETA), on a terminal only."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=corpus.total_bytes or None, unit="B", unit_scale=True, unit_divisor=1000,
        desc="data: preparing", smoothing=0.1, dynamic_ncols=True, disable=None,
    )  # fmt: skip


# --- finishing: split, statistics, manifest -------------------------------------------------


def split_point(work: Path, shards: list[dict[str, Any]], val_fraction: float) -> tuple[int, int]:
    """(first validation token, n validation documents) for the stream of ``shards``: the same
    rule as :func:`kiln.data.shards.split_documents`, reading only the tail's document index."""
    n_docs = sum(s["n_documents"] for s in shards)
    total = sum(s["n_tokens"] for s in shards)
    if total < 2:
        raise DataError(f"the corpus has {total} token(s), too few to split into train and val.")
    cap = max(MAX_VAL_SHARE, val_fraction) * total
    n_val = min(math.ceil(val_fraction * n_docs), n_docs - 1)
    taken, tail = 0, 0  # the largest m <= n_val whose last m documents fit under the cap
    last_first = (n for shard in reversed(shards) for n in doc_lengths(work, shard)[::-1].tolist())
    for n in last_first:
        if taken >= n_val or tail + n > cap:
            break
        tail += n
        taken += 1
    if taken >= 1:
        return total - tail, taken
    n_val_tokens = min(max(1, math.ceil(val_fraction * total)), total - 1)
    return total - n_val_tokens, 0


def _finish(
    corpus: Corpus, tok: Tokenizer, cfg: DataConfig, work: Path, shards: list, settings: str
) -> dict[str, Any]:
    chain = hashlib.sha256()
    for s in shards:
        chain.update(bytes.fromhex(s["text_sha256"]))
    text_hash = chain.hexdigest()
    key = _sha(f"kiln-shards-v{FORMAT_VERSION}", text_hash, tok.to_json(), settings)
    total = sum(s["n_tokens"] for s in shards)
    n_docs = sum(s["n_documents"] for s in shards)
    boundary, n_val_docs = split_point(work, shards, cfg.val_fraction)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": corpus.spec,
        "text_field": cfg.text_field,
        "tokenizer_source": cfg.tokenizer,
        "corpus_sha256": text_hash,
        "n_documents": n_docs,
        "n_tokens": total,
        "text_bytes": sum(s["text_bytes"] for s in shards),
        "skipped": dict(corpus.skipped),
        "dtype": np.dtype(np.uint16 if tok.vocab_size < 65536 else np.uint32).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "val_fraction": cfg.val_fraction,
        "shard_mb": cfg.shard_mb,
        "splits": {
            "train": {
                "start": 0,
                "stop": boundary,
                "n_tokens": boundary,
                "n_documents": n_docs - n_val_docs,
            },
            "val": {
                "start": boundary,
                "stop": total,
                "n_tokens": total - boundary,
                "n_documents": n_val_docs,
            },
        },  # fmt: skip
        "split_by": "documents" if n_val_docs else "tokens",
        "shards": shards,
    }
    val = split_view(open_stream(work, manifest, verify=False), manifest, "val")
    manifest["val_unigram_entropy_nats"] = unigram_entropy(val, tok.vocab_size)
    tok.save(work)
    atomic_write_json(work / "manifest.json", manifest)
    for s in range(len(shards)):
        (work / f"shard-{s:05d}.json").unlink(missing_ok=True)
    return manifest


def verify_cache(directory: Path) -> int:
    """Check every shard of a prepared corpus by size and sha256; returns the bytes checked."""
    manifest = read_manifest(directory)
    open_stream(directory, manifest, verify=True)
    return sum(s["bytes"] for s in manifest["shards"])
