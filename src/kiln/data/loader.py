"""Resumable, data-parallel token loader over a 1-D token array.

Samples are the non-overlapping windows of ``seq_len + 1`` tokens that start at multiples of
``seq_len`` (window i covers tokens ``[i·L, i·L + L]``; x = w[:-1], y = w[1:]), so there are
``n_windows = (n_tokens - 1) // L`` of them. Epoch e visits them in the order of
``np.random.default_rng((seed, e)).permutation(n_windows)``; optimizer step k of the epoch takes
the global slice ``[k·B, (k+1)·B)`` of that permutation (B = global batch), and data-parallel rank
r takes its contiguous part ``[r·B/dp, (r+1)·B/dp)``. An epoch has ``n_windows // B`` steps: the
``n_windows mod B`` windows left over are dropped for that epoch (the next permutation puts
different windows at the end, so nothing is dropped systematically).

The state (epoch, step in epoch) is global, not per rank, so a run can resume with another
data-parallel size and continue exactly where it stopped: the same global batches, re-split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.errors import DataError


class TokenLoader:
    """Deterministic batches of (x, y) windows for one data-parallel rank."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if batch_size % dp_size != 0:
            raise DataError(
                f"batch size {batch_size} must be divisible by the data-parallel size {dp_size}."
            )
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}.")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self.steps_per_epoch = self.n_windows // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"training data has {len(tokens)} tokens = {self.n_windows} windows of "
                f"{seq_len}+1 tokens, fewer than one batch of {batch_size}; use a bigger corpus, "
                "a smaller batch size or a shorter seq_len."
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def local_batch_size(self) -> int:
        """Sequences this rank gets per step (global batch / dp size)."""
        return self.batch_size // self.dp_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def sample_indices_for_step(
        self, epoch: int | None = None, step: int | None = None, rank: int | None = None
    ) -> np.ndarray:
        """Window indices rank ``rank`` reads at ``step`` of ``epoch`` (default: the next batch)."""
        epoch = self.epoch if epoch is None else epoch
        step = self.step_in_epoch if step is None else step
        rank = self.dp_rank if rank is None else rank
        b = self.local_batch_size
        start = step * self.batch_size + rank * b
        return self._permutation(epoch)[start : start + b]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each a LongTensor [batch_size / dp_size, seq_len]; advances the state."""
        x, y = windows(self.tokens, self.sample_indices_for_step(), self.seq_len)
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Global position, plain ints only (fits any checkpoint format)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``sd``; any dp_size works since the state is global."""
        for name in ("seq_len", "batch_size", "n_windows"):
            if name in sd and int(sd[name]) != getattr(self, name):
                raise DataError(
                    f"data loader state has {name} {int(sd[name])} but this run has "
                    f"{getattr(self, name)}; resume with the same data settings."
                )
        step = int(sd["step_in_epoch"])
        if not 0 <= step < self.steps_per_epoch:
            raise DataError(
                f"data loader state step_in_epoch {step} is outside 0..{self.steps_per_epoch - 1}."
            )
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.step_in_epoch = step
        self._perm_epoch = -1


def windows(
    tokens: np.ndarray, indices: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows ``indices`` of ``seq_len + 1`` tokens into (x, y) LongTensors."""
    idx = np.asarray(indices, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1], w[:, 1:]


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches × batch_size`` windows, in order (fewer if val is short).

    Deterministic and identical on every rank, so validation loss is comparable across runs.
    The last batch may be smaller when validation runs out of windows.
    """
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(
            f"validation data has {len(tokens)} tokens, fewer than one window of "
            f"{seq_len}+1; use a bigger corpus, a larger data.val_fraction or a shorter seq_len."
        )
    take = np.arange(min(n_windows, n_batches * batch_size))
    return [
        windows(tokens, take[i : i + batch_size], seq_len) for i in range(0, len(take), batch_size)
    ]
