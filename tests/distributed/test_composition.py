"""Composed layouts on 4 gloo processes match one process: TP2 × PP2, FSDP2 × TP2 and PP2 × DP2
(FSDP2 inside each stage), applied by parallelize_model in its documented order, on a Llama-style
model (untied, RoPE, GQA) whose vocabulary (301) TP does not divide and whose 3 blocks split
unevenly over two stages. Same initial weights, same global batch, 10 SGD steps through the real
Trainer: losses within 1e-5 relative, every parameter within 1e-5. One process group runs all
three layouts."""

import torch
import torch.distributed as dist

from kiln.config import ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.train.optim import LRSchedule
from kiln.train.plan import loop_plan
from kiln.train.trainer import Hooks, Trainer
from tests.distributed.parity import (
    BATCH,
    LLAMA,
    LR,
    SEQ,
    STEPS,
    assert_match,
    full_params,
    initial_model,
    spawn,
    tokens,
)

SHAPE = LLAMA.replace(n_layers=3)
LAYOUTS = {
    "tp2 x pp2": ParallelConfig(tensor=2, pipeline=2, pipeline_schedule="1F1B"),
    "fsdp2 x tp2": ParallelConfig(tensor=2),
    "pp2 x dp2 (fsdp)": ParallelConfig(pipeline=2, pipeline_schedule="GPipe"),
}


def train(cfg: ParallelConfig, rank: int = 0, world: int = 1):
    dims = ParallelDims.from_config(cfg, rank, world, rank, torch.device("cpu"))
    model, seed = initial_model(SHAPE, dims)
    built = parallelize_model(model, dims, cfg, False, log=lambda _: None, seed=seed)
    params = [p for part in built.model_parts for p in part.parameters()]
    data = tokens()
    records: list[dict] = []
    trainer = Trainer(
        built, torch.optim.SGD(params, lr=LR), LRSchedule(LR, 0, STEPS, 1.0, "linear"),
        TokenLoader(data, SEQ, BATCH, seed=0, dp_rank=dims.dp_rank, dp_size=dims.dp_size),
        val_batches(data, SEQ, BATCH, 1), TrainConfig(precision="fp32", eval_every=0),
        loop_plan(STEPS, BATCH, BATCH // dims.dp_size, SEQ, world), dims,
        log_every=1, hooks=Hooks(log=lambda _: None, write_metrics=records.append),
    )  # fmt: skip
    trainer.fit()
    full = {}
    for part in built.model_parts:
        full.update(full_params(part))
    if dist.is_initialized():
        every: list = [None] * world
        dist.all_gather_object(every, full)
        full = {k: v for d in every for k, v in d.items()}
    return [r["loss"] for r in records], full


def _layouts(rank: int, world: int) -> dict:
    return {name: train(cfg, rank, world) for name, cfg in LAYOUTS.items()}


def test_composed_layouts_match_one_process(tmp_path):
    want = train(ParallelConfig())
    for name, got in spawn(_layouts, 4, str(tmp_path / "composed.pt")).items():
        assert_match(got, want, name)
