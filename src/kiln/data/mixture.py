"""Mixtures: several prepared corpora, weighted, shown as one train and one val token array.

With components of n_i training tokens and weights w_i (Σ w_i = 1), the mixture has
T = Σ n_i training tokens (the size of the plain concatenation) of which component i supplies
t_i = w_i · T: ⌊t_i / n_i⌋ full passes over its training split, then a contiguous run of whole
documents starting at a document chosen by ``np.random.default_rng((seed, i))``, wrapping
around, until t_i is reached (the Pile's "epochs per component" with the remainder sampled). The
realised share of each component differs from w_i by at most one document; it is reported.
Nothing is copied: the mixture is a :class:`TokenView` over the components' shards, and the
loader's shuffle of windows mixes the components within every batch.

Validation is each component's own validation split (``val_by_component``); the single val
array interleaves blocks of ``VAL_BLOCK`` tokens from them in proportion to the weights
(smooth weighted round-robin), so the first validation batches already cover every component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.shards import TokenView, doc_lengths

VAL_BLOCK = 4096
"""Tokens taken from one component at a time when interleaving validation."""


def doc_boundary_at_or_after(directory: Path, manifest: dict[str, Any], token: int) -> int:
    """The first document start at or after stream position ``token`` (or the stream's end)."""
    offset = 0
    for shard in manifest["shards"]:
        if offset + shard["n_tokens"] > token:
            ends = offset + np.cumsum(doc_lengths(directory, shard))
            starts = np.concatenate([[offset], ends[:-1]])
            i = int(np.searchsorted(starts, token, side="left"))
            return int(starts[i]) if i < len(starts) else int(ends[-1])
        offset += shard["n_tokens"]
    return offset


def mix_train(
    components: list[dict[str, Any]], seed: int
) -> tuple[TokenView, list[dict[str, Any]]]:
    """The mixture's training view and, per component, its target and realised share.

    Each component is a dict with ``name``, ``weight``, ``dir``, ``manifest``, ``stream``
    (its whole token stream) and ``train`` (its training split view).
    """
    total = sum(len(c["train"]) for c in components)
    parts: list[tuple[np.ndarray, int, int]] = []
    taken = []
    for i, c in enumerate(components):
        n = len(c["train"])
        target = round(c["weight"] * total)
        full, rest = divmod(target, n)
        parts += [p for _ in range(full) for p in c["train"].parts]
        got = full * n
        if rest:
            ranges, got_rest = _partial_pass(c, rest, np.random.default_rng((seed, i)))
            parts += ranges
            got += got_rest
        taken.append(got)
    realised = sum(taken)
    report = [
        {"name": c["name"], "weight": c["weight"], "train_tokens": t, "share": t / realised,
         "epochs": t / len(c["train"]), "cache_dir": str(c["dir"])}
        for c, t in zip(components, taken)
    ]  # fmt: skip
    return TokenView(parts), report


def _partial_pass(c: dict[str, Any], want: int, rng: np.random.Generator):
    """Whole documents of component ``c``'s training split, from a random document on (wrapping
    around), until at least ``want`` tokens: (shard ranges, tokens taken)."""
    train, n = c["train"], len(c["train"])
    start = doc_boundary_at_or_after(c["dir"], c["manifest"], int(rng.integers(n)))
    start = start if start < n else 0
    stop = start + want
    if stop <= n:
        end = min(doc_boundary_at_or_after(c["dir"], c["manifest"], stop), n)
        return train.ranges(start, end), end - start
    end = min(doc_boundary_at_or_after(c["dir"], c["manifest"], stop - n), start)
    return train.ranges(start, n) + train.ranges(0, end), n - start + end


def mix_val(components: list[dict[str, Any]]) -> TokenView:
    """The components' validation splits interleaved in blocks, in proportion to the weights."""
    vals = [c["val"] for c in components]
    pos = [0] * len(vals)
    credit = [0.0] * len(vals)
    parts: list[tuple[np.ndarray, int, int]] = []
    live = [i for i, v in enumerate(vals) if len(v)]
    while live:
        for i in live:
            credit[i] += components[i]["weight"]
        pick = max(live, key=lambda i: credit[i])
        credit[pick] -= sum(components[i]["weight"] for i in live)
        stop = min(pos[pick] + VAL_BLOCK, len(vals[pick]))
        parts += vals[pick].ranges(pos[pick], stop)
        pos[pick] = stop
        live = [i for i in live if pos[i] < len(vals[i])]
    return TokenView(parts)
