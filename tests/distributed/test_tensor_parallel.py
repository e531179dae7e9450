"""TP2 (GPT-3 style: tied embeddings, learned positions, biases) and TP2 + sequence parallel
(Llama style: RoPE, RMSNorm, SwiGLU, GQA) on 2 gloo processes match one process, with a
vocabulary (301) the degree does not divide. Same initial weights (one seed, initialised whole
and then sharded), same global batch, 10 SGD steps through the real Trainer: losses within 1e-5
relative and every parameter within 1e-5."""

import pytest
import torch

from kiln.config import ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.distributed.tensor_parallel import check_tensor_parallel
from kiln.errors import ConfigError
from kiln.train.optim import LRSchedule
from kiln.train.plan import loop_plan
from kiln.train.trainer import Hooks, Trainer
from tests.distributed.parity import (
    BATCH,
    LR,
    SEQ,
    SHAPES,
    STEPS,
    assert_match,
    full_params,
    initial_model,
    spawn,
    tokens,
)


def train(shape, cfg: ParallelConfig, rank: int = 0, world: int = 1):
    dims = ParallelDims.from_config(cfg, rank, world, rank, torch.device("cpu"))
    model, seed = initial_model(shape, dims)
    built = parallelize_model(model, dims, cfg, False, log=lambda _: None, seed=seed)
    model = built.model_parts[0]
    data = tokens()
    records: list[dict] = []
    trainer = Trainer(
        built, torch.optim.SGD(model.parameters(), lr=LR),
        LRSchedule(LR, 0, STEPS, 1.0, "linear"),
        TokenLoader(data, SEQ, BATCH, seed=0, dp_rank=dims.dp_rank, dp_size=dims.dp_size),
        val_batches(data, SEQ, BATCH, 1), TrainConfig(precision="fp32", eval_every=0),
        loop_plan(STEPS, BATCH, BATCH // dims.dp_size, SEQ, world), dims,
        log_every=1, hooks=Hooks(log=lambda _: None, write_metrics=records.append),
    )  # fmt: skip
    trainer.fit()
    val = trainer.evaluate()
    return [r["loss"] for r in records], full_params(model), val


LAYOUTS = {
    "tp2": ParallelConfig(tensor=2, sequence_parallel=False),
    "tp2+sp": ParallelConfig(tensor=2, sequence_parallel=True),
}


CASES = [("gpt3", "tp2"), ("llama", "tp2+sp")]  # the other two pairs cost time, add nothing


def _layouts(rank: int, world: int) -> dict:
    return {
        (style, name): train(SHAPES[style], LAYOUTS[name], rank, world) for style, name in CASES
    }


def test_tensor_parallel_matches_one_process(tmp_path):
    results = spawn(_layouts, 2, str(tmp_path / "tp.pt"))
    for (style, name), (losses, params, val) in results.items():
        want = train(SHAPES[style], ParallelConfig())
        assert_match((losses, params), want[:2], f"{style} {name}")
        assert abs(val - want[2]) <= 1e-5 * abs(want[2]), (style, name, val, want[2])


@pytest.mark.parametrize(
    "change, field",
    [(dict(n_heads=3, n_kv_heads=3), "n_heads"), (dict(n_kv_heads=1), "n_kv_heads"),
     (dict(d_ffn=63), "d_ffn")],
)  # fmt: skip
def test_degree_that_does_not_divide_the_shape_is_refused(change, field):
    with pytest.raises(ConfigError, match=f"parallel.tensor 2 does not divide model.{field}"):
        check_tensor_parallel(SHAPES["llama"].replace(**change), 2)
