"""FSDP2 and DDP on 2 and 4 gloo processes match one process with the same global batch.

The real parts run: the model built on meta → parallelize_model (each rank allocates its
shards) → Trainer.fit with the data-parallel TokenLoader,
gradient clipping over (D)Tensors and full-state-dict gathering. The optimizer is plain SGD
(STYLE: AdamW amplifies float noise); after 10 steps parameters agree within 1e-5 and every
step's loss within 1e-4.
"""

import datetime
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.models.gpt import GPTConfig
from kiln.train.optim import LRSchedule
from kiln.train.plan import loop_plan
from kiln.train.trainer import Hooks, Trainer
from tests.distributed.conftest import free_port
from tests.distributed.parity import initial_model

SHAPE = GPTConfig(
    n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64, vocab_size=64,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip
STEPS, BATCH, SEQ = 10, 8, 16


def train(mode: str, rank: int = 0, world: int = 1) -> tuple[list[float], dict]:
    """Losses and full (unsharded) parameters after STEPS SGD steps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    noise = np.random.default_rng(0).integers(0, 3, 4096)
    tokens = ((np.arange(4096) * 5 + noise) % SHAPE.vocab_size).astype(np.uint16)
    dims = ParallelDims(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    model, seed = initial_model(SHAPE, dims)
    built = parallelize_model(model, dims, ParallelConfig(data=mode), False, lambda _: None, seed)
    model = built.model_parts[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    records: list[dict] = []
    trainer = Trainer(
        built, optimizer, LRSchedule(0.5, 0, STEPS, 1.0, "linear"),
        TokenLoader(tokens, SEQ, BATCH, seed=0, dp_rank=rank, dp_size=world),
        val_batches(tokens, SEQ, BATCH, 1), TrainConfig(precision="fp32", eval_every=0),
        loop_plan(STEPS, BATCH, BATCH // world, SEQ, world), dims, log_every=1,
        hooks=Hooks(log=lambda _: None, write_metrics=records.append),
    )  # fmt: skip
    trainer.fit()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return [r["loss"] for r in records], {k: v.detach().clone() for k, v in full.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = {mode: train(mode, rank, world) for mode in ("ddp", "fsdp")}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2])  # 4 ranks: test_composition, test_reshard_chain
def test_ddp_and_fsdp_match_one_process(tmp_path, world):
    want_losses, want_params = train("fsdp")  # one process: parallelize() leaves it plain
    out = str(tmp_path / "results.pt")
    mp.start_processes(_worker, args=(world, free_port(), out), nprocs=world, start_method="spawn")
    for mode, (losses, params) in torch.load(out).items():
        assert len(losses) == STEPS, mode
        np.testing.assert_allclose(losses, want_losses, rtol=0, atol=1e-4, err_msg=mode)
        assert params.keys() == want_params.keys()
        for name, value in params.items():
            diff = (value - want_params[name]).abs().max().item()
            assert diff <= 1e-5, (mode, world, name, diff)
    assert want_losses[-1] < want_losses[0]  # it trained
