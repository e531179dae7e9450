"""PP2 on 2 gloo processes matches one process under every schedule torch ships (GPipe, 1F1B,
Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV): a 5-layer model
cut unevenly (embedding and head weigh as a layer: 2 + 3 blocks, or 1 + 2 + 2 + 1 over four
stages), same initial weights, same global batch, 10 SGD steps through the real Trainer with
gradient clipping across stages: losses within 1e-5 relative and every parameter within 1e-5;
validation matches too, run one micro-batch at a time.
One process group runs all the schedules. Bad pipeline layouts are refused in one sentence."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kiln.config import ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.distributed.pipeline import SCHEDULES, check_pipeline, stage_layers
from kiln.errors import ConfigError
from kiln.train.optim import LRSchedule
from kiln.train.plan import loop_plan
from kiln.train.trainer import Hooks, Trainer
from tests.distributed.parity import (
    BATCH,
    GPT3,
    LR,
    SEQ,
    STEPS,
    assert_match,
    full_params,
    initial_model,
    spawn,
    tokens,
)

SHAPE = GPT3.replace(n_layers=5, tie_embeddings=False)
CLIP = 0.5  # small enough to clip: the norm must be the one over both stages


def train(cfg: ParallelConfig, rank: int = 0, world: int = 1):
    dims = ParallelDims.from_config(cfg, rank, world, rank, torch.device("cpu"))
    model, seed = initial_model(SHAPE, dims)
    built = parallelize_model(model, dims, cfg, False, log=lambda _: None, seed=seed)
    pipeline = built.pipeline
    if pipeline is not None:
        model = nn.ModuleList(built.model_parts)
    data = tokens()
    records: list[dict] = []
    trainer = Trainer(
        built, torch.optim.SGD(model.parameters(), lr=LR), LRSchedule(LR, 0, STEPS, 1.0, "linear"),
        TokenLoader(data, SEQ, BATCH, seed=0, dp_rank=dims.dp_rank, dp_size=dims.dp_size),
        val_batches(data, SEQ, BATCH, 1),
        TrainConfig(precision="fp32", eval_every=0, grad_clip=CLIP),
        loop_plan(STEPS, BATCH, BATCH // dims.dp_size, SEQ, world), dims,
        log_every=1, hooks=Hooks(log=lambda _: None, write_metrics=records.append),
    )  # fmt: skip
    trainer.fit()
    seen: list[int] = []  # the batch sizes validation's stage forwards see
    for m in pipeline.modules if pipeline is not None else []:
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    val = trainer.evaluate()
    params = {}
    for part in model if pipeline else [model]:
        params.update(full_params(part))
    if dist.is_initialized():
        every: list = [None] * world
        dist.all_gather_object(every, params)
        params = {k: v for d in every for k, v in d.items()}
    return [r["loss"] for r in records], params, val, [r["grad_norm"] for r in records], seen


def _schedules(rank: int, world: int) -> dict:
    return {
        s: train(ParallelConfig(pipeline=2, pipeline_schedule=s), rank, world) for s in SCHEDULES
    }


def test_pipeline_matches_one_process_under_every_schedule(tmp_path):
    want = train(ParallelConfig())
    assert max(want[3]) > CLIP  # clipping happened
    for schedule, got in spawn(_schedules, 2, str(tmp_path / "pp.pt")).items():
        assert_match(got[:2], want[:2], schedule)
        assert abs(got[2] - want[2]) <= 1e-5 * want[2], (schedule, got[2], want[2])
        assert max(abs(a - b) for a, b in zip(got[3], want[3])) <= 1e-4 * max(want[3]), schedule
        assert got[4] and max(got[4]) < BATCH, (schedule, got[4])  # validation micro-batched


def test_layers_are_split_with_embedding_and_head_weighed_as_layers():
    assert [stage_layers(5, 2, s) for s in range(2)] == [["0", "1"], ["2", "3", "4"]]
    assert [stage_layers(5, 4, s) for s in range(4)] == [[], ["0", "1"], ["2", "3"], ["4"]]


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(schedule="ZBVZeroBubble", per_rank=1), "places two stages per rank"),
        (dict(schedule="1F1B", per_rank=2), "runs one stage per rank"),
        (dict(pp=4, schedule="Interleaved1F1B"), "8 pipeline stages .* exceed model.n_layers 5"),
        (dict(microbatches=1), "parallel.microbatches is 1 but the pipeline has 2 stages"),
        (dict(shape=SHAPE.replace(tie_embeddings=True)), "model.tie_embeddings is true"),
        (dict(schedule="Zigzag"), "parallel.pipeline_schedule is 'Zigzag'"),
    ],
)
def test_bad_pipeline_layouts_are_refused(change, pattern):
    args = dict(shape=SHAPE, pp=2, schedule="1F1B", microbatches=None, per_rank=None) | change
    with pytest.raises(ConfigError, match=pattern):
        check_pipeline(*args.values())
