"""Shared pieces of the layout parity tests: tiny shapes in both styles, a fixed token stream,
the single-process reference and the spawn harness (gloo, a timeout on every group)."""

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.models.gpt import GPTConfig
from tests.distributed.conftest import free_port

VOCAB = 301  # no degree divides it (as GPT-2's 50257)
GPT3 = GPTConfig(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_head=8, d_ffn=64, vocab_size=VOCAB,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip
LLAMA = GPTConfig(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_ffn=64, vocab_size=VOCAB,
    max_seq_len=16, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
    tie_embeddings=False,
)  # fmt: skip
SHAPES = {"gpt3": GPT3, "llama": LLAMA}
STEPS, BATCH, SEQ, LR = 10, 8, 16, 0.5


def initial_model(shape: GPTConfig, dims):
    """(model, seed) to hand parallelize_model: the one-process reference is built whole the
    plain way (build_model); a layout gets the meta-device model and the seed, so each rank
    allocates only its shards (kiln.distributed.materialize). The parity checks then also prove
    that both give the same initial weights."""
    from kiln.distributed.materialize import meta_model
    from kiln.train.run import build_model

    if dims.world_size == 1:
        return build_model(shape, dims.device, seed=0), None
    return meta_model(shape), 0


def tokens() -> np.ndarray:
    noise = np.random.default_rng(0).integers(0, 3, 4096)
    return ((np.arange(4096) * 5 + noise) % VOCAB).astype(np.uint16)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}


def assert_match(got, want, label: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Losses within ``rtol`` relative, every parameter within ``atol``."""
    losses, params = got
    want_losses, want_params = want
    assert len(losses) == len(want_losses) == STEPS, label
    np.testing.assert_allclose(losses, want_losses, rtol=rtol, atol=0, err_msg=label)
    assert params.keys() == want_params.keys(), label
    for name, value in params.items():
        diff = (value - want_params[name]).abs().max().item()
        assert diff <= atol, (label, name, diff)
    assert np.ptp(want_losses) > 1e-3, label  # the steps changed the model


def _worker(rank: int, world: int, port: int, out: str, fn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = fn(rank, world)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, out: str) -> dict:
    """Run ``fn(rank, world) -> results`` on ``world`` gloo processes; rank 0's results."""
    mp.start_processes(_worker, args=(world, free_port(), out, fn), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return torch.load(out)
