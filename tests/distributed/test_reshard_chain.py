"""One run carried through four layouts by DCP checkpoints: FSDP2 × 4 processes (steps 1-2) →
TP2 × PP2 (3-4) → PP2 × DP2 (5-6) → one process (7-8), each a resume of the one before with
new parallel degrees. Against an uninterrupted one-process run: the loss of every step, every
parameter and both AdamW moments at the end agree within 1e-5, and every checkpoint holds the
same data position (so each step read the same global batch: no sample skipped or repeated).

A tiny untied GPT (d 32, 2 layers, no biases: a key bias's gradient is rounding
noise that AdamW would turn into layout-dependent steps), constant LR after warm-up so runs of
any length share one schedule."""

import numpy as np
import pytest

from kiln.data.loader import TokenLoader
from kiln.train.checkpoint import read_meta
from tests.distributed.conftest import chain_equals_uninterrupted
from tests.e2e.helpers import tiny_flags

CHAIN = [  # (processes, layout flags, last step)
    (4, [], 2),
    (4, ["--parallel.tensor", "2", "--parallel.pipeline", "2"], 4),
    (4, ["--parallel.pipeline", "2", "--parallel.pipeline_schedule", "GPipe"], 6),
    (1, [], 8),
]
DP_SIZES = [4, 1, 2, 1]  # the data-parallel degree each layout leaves


def _flags(run, corpus, steps: int) -> list[str]:
    return [*tiny_flags(run, corpus, steps=steps), "--model.tie_embeddings", "false",
            "--model.bias", "false", "--log.every", "1", "--train.eval_every", "0",
            "--checkpoint.every", "2", "--checkpoint.keep", "4", "--train.min_lr_ratio", "1.0",
            "--train.warmup_steps", "2", "--log.tensorboard", "false"]  # fmt: skip


def _batches_read(loader_state: dict, dp: int, steps: int) -> list[set[int]]:
    """The windows all ``dp`` ranks read together in each of ``steps`` steps from a state."""
    tokens = np.zeros(loader_state["n_windows"] * loader_state["seq_len"] + 1, dtype=np.uint16)
    args = (tokens, loader_state["seq_len"], loader_state["batch_size"])
    loaders = [TokenLoader(*args, seed=0, dp_rank=r, dp_size=dp) for r in range(dp)]
    batches = [set() for _ in range(steps)]
    for loader in loaders:
        loader.load_state_dict(loader_state)
        for step in range(steps):
            batches[step] |= {int(i) for i in loader.sample_indices_for_step()}
            loader.next_batch()
    return batches


@pytest.mark.timeout(1200)  # five launches, three of them 4-process torchrun
def test_fsdp4_to_tp2pp2_to_pp2dp2_to_one_process(tmp_path, corpus, kiln_env):
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    chain_equals_uninterrupted(tmp_path, CHAIN, lambda r, last: _flags(r, corpus, last), env)
    ref, run = tmp_path / "ref", tmp_path / "chain"

    # The data position: every checkpoint of the chain holds the reference's loader state, and
    # the ranks of each layout, replaying from the state they resumed from, read exactly the
    # reference's global batches.
    start = read_meta(ref / "checkpoints/step-0000002")["loader"]
    want = _batches_read(start, 1, 6)
    got = []
    for i, (_, layout, last) in enumerate(CHAIN):
        state = read_meta(run / f"checkpoints/step-{last:07d}")["loader"]
        assert state == read_meta(ref / f"checkpoints/step-{last:07d}")["loader"], layout
        if i + 1 < len(CHAIN):  # what the next layout's ranks read from this state
            got += _batches_read(state, DP_SIZES[i + 1], 2)
    assert got == want and all(len(b) == 8 for b in got)
