"""A tiny Trainer built from the real parts (build_model → parallelize → Trainer), for tests that
drive the training loop in-process, in one process or under a gloo process group."""

from __future__ import annotations

import numpy as np
import torch

from kiln.config import ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.models.gpt import GPTConfig
from kiln.train.optim import LRSchedule, build_optimizer
from kiln.train.plan import loop_plan
from kiln.train.run import build_model
from kiln.train.trainer import Hooks, Trainer

SHAPE = GPTConfig(
    n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64, vocab_size=64,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip
BATCH, SEQ = 8, 16


def tokens() -> np.ndarray:
    noise = np.random.default_rng(0).integers(0, 3, 4096)
    return ((np.arange(4096) * 5 + noise) % SHAPE.vocab_size).astype(np.uint16)


def make_trainer(
    steps: int,
    *,
    micro: int | None = None,
    rank: int = 0,
    world: int = 1,
    data: str = "fsdp",
    cfg: TrainConfig | None = None,
    callbacks=None,
    on_record=None,
    lr: float = 0.5,
    adamw: bool = False,
    activation_checkpointing: bool = False,
) -> tuple[Trainer, torch.nn.Module, dict]:
    """(trainer, plain model, log) with SGD (or Kiln's AdamW); ``log`` collects metrics records,
    log lines and the steps at which a checkpoint was requested. ``on_record(record)`` runs
    after each line."""
    dims = ParallelDims(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    model = build_model(SHAPE, dims.device, seed=0)
    parallel = ParallelConfig(data=data, activation_checkpointing=activation_checkpointing)
    built = parallelize_model(model, dims, parallel, False, log=lambda _: None)
    cfg = cfg or TrainConfig(precision="fp32", eval_every=0, lr=lr)
    if adamw:
        optimizer = build_optimizer(model, cfg)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    log: dict = {"records": [], "lines": [], "checkpoints": []}
    data_tokens = tokens()
    trainer: Trainer

    def write(record):
        log["records"].append(record)
        if on_record is not None:
            on_record(record)

    trainer = Trainer(
        built, optimizer, LRSchedule(cfg.lr, 0, steps, 1.0, "linear"),
        TokenLoader(data_tokens, SEQ, BATCH, seed=0, dp_rank=rank, dp_size=world),
        val_batches(data_tokens, SEQ, BATCH, 1), cfg,
        loop_plan(steps, BATCH, micro or BATCH // world, SEQ, world), dims,
        log_every=1, callbacks=callbacks,
        hooks=Hooks(
            log=log["lines"].append, write_metrics=write,
            save_checkpoint=lambda: log["checkpoints"].append(trainer.state.step),
        ),
    )  # fmt: skip
    return trainer, model, log


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of the parameters (FSDP2 DTensors gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}
