"""``prepare_data(cfg)``: the tokenizer and the train/val token arrays the trainer needs.

Under torchrun — or several jobs on a shared file system — every process calls it: locks
(``kiln.data.lock``) let one process train the tokenizer and prepare each corpus while the
others wait, then every process memory-maps the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import DataConfig
from kiln.data.mixture import mix_train, mix_val
from kiln.data.prepare import prepare_corpus
from kiln.data.shards import TokenView, open_stream, read_manifest, split_view, unigram_entropy
from kiln.data.tokenizer import Tokenizer, build_tokenizer


@dataclass
class PreparedData:
    """Everything the trainer needs from the data step."""

    tokenizer: Tokenizer
    train: TokenView
    """Training tokens, 1-D, memory-mapped (indexing reads only what it asks for)."""
    val: TokenView
    """Validation tokens, 1-D (a mixture interleaves its components' validation splits)."""
    manifest: dict[str, Any]
    """The prepared corpus's manifest; for a mixture, a summary with ``mixture`` per component."""
    cache_dir: Path
    """The ``<root>/<key>`` directory holding the shards (a mixture: the first component's)."""
    reused: bool
    """True when every shard came from the cache (nothing was tokenised)."""
    val_by_component: dict[str, TokenView] = field(default_factory=dict)
    """Each mixture component's own validation split, by its corpus spec."""


def prepare_data(cfg: DataConfig, log=print, progress: bool = False) -> PreparedData:
    """Build the tokenizer and tokenise each corpus into (or reuse) cached shards."""
    tok = build_tokenizer(cfg, log=log)
    components = []
    for spec, weight in cfg.components():
        directory, reused = prepare_corpus(spec, tok, cfg, log=log, progress=progress)
        if reused:
            log(f"data: reusing token shards in {directory}")
        components.append(_open(spec, weight, directory, reused))
    if len(components) == 1:
        c = components[0]
        data = PreparedData(c["tok"], c["train"], c["val"], c["manifest"], c["dir"], c["reused"])
    else:
        data = _mixture(components, cfg, log)
    log(
        f"data: {len(data.train):,} train / {len(data.val):,} val tokens, "
        f"vocab {data.tokenizer.vocab_size}"
    )
    return data


def _open(spec: str, weight: float | None, directory: Path, reused: bool) -> dict[str, Any]:
    manifest = read_manifest(directory)
    stream = open_stream(directory, manifest)
    return {
        "name": spec,
        "weight": weight,
        "dir": directory,
        "manifest": manifest,
        "reused": reused,
        "tok": Tokenizer.load(directory / "tokenizer.json"),
        "train": split_view(stream, manifest, "train"),
        "val": split_view(stream, manifest, "val"),
    }


def _mixture(components: list[dict[str, Any]], cfg: DataConfig, log) -> PreparedData:
    train, report = mix_train(components, cfg.mixture_seed)
    val = mix_val(components)
    for r in report:
        log(
            f"data: mixture {r['name']}: weight {r['weight']:.3f}, realised "
            f"{r['share']:.3f} of {len(train):,} train tokens ({r['epochs']:.2f} epochs)"
        )
    first = components[0]
    vocab = first["manifest"]["vocab_size"]
    manifest = {
        "mixture": report,
        "vocab_size": vocab,
        "eos_id": first["manifest"]["eos_id"],
        "dtype": first["manifest"]["dtype"],
        "splits": {"train": {"n_tokens": len(train)}, "val": {"n_tokens": len(val)}},
        "val_by_component": {c["name"]: len(c["val"]) for c in components},
        "val_unigram_entropy_nats": unigram_entropy(val, vocab),
        "mixture_seed": cfg.mixture_seed,
    }
    return PreparedData(
        first["tok"], train, val, manifest, first["dir"], all(c["reused"] for c in components),
        {c["name"]: c["val"] for c in components},
    )  # fmt: skip
