"""One MoE run carried EP2 (steps 1-2, torchrun, 2 processes) → EP1 (3-4, one process) → EP2
(5-6, torchrun) through ``kiln train --resume`` with a new ``--parallel.expert``, against an
uninterrupted one-process run: every step's loss, every parameter, the routers' expert bias and
both AdamW moments at the end within 1e-5 (relative for the losses).

The tiny MoE (4 experts, top-2, aux loss, z-loss and the expert-bias update) keeps one
micro-batch of 4 sequences everywhere (two accumulated in one process, one per rank under EP2),
so the balancing losses and the expert loads see the same tokens in every layout. Constant LR
after warm-up, so runs of any length share one schedule."""

import json

import numpy as np
import pytest
import torch

from kiln.train.checkpoint import read_meta, read_tensors
from tests.distributed.conftest import torchrun
from tests.e2e.helpers import kiln, tiny_flags

CHAIN = [(2, ["--parallel.expert", "2"], 2), (1, [], 4), (2, ["--parallel.expert", "2"], 6)]


def _flags(run, corpus, steps: int) -> list[str]:
    return [*tiny_flags(run, corpus, steps=steps), "--model.tie_embeddings", "false",
            "--model.bias", "false", "--model.position", "rope", "--model.norm", "rmsnorm",
            "--model.activation", "swiglu", "--moe.experts", "4", "--moe.top_k", "2",
            "--moe.normalize_top_k", "true", "--moe.d_expert", "32",
            "--moe.z_loss_coef", "0.001", "--moe.bias_update_rate", "0.01",
            "--train.micro_batch_size", "4", "--log.every", "1", "--train.eval_every", "0",
            "--checkpoint.every", "2", "--checkpoint.keep", "4", "--train.min_lr_ratio", "1.0",
            "--train.warmup_steps", "2", "--log.tensorboard", "false"]  # fmt: skip


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)  # four launches, two of them 2-process torchrun
def test_ep2_to_ep1_to_ep2_resumes_equal_to_an_uninterrupted_run(tmp_path, corpus, kiln_env):
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    ref, run = tmp_path / "ref", tmp_path / "chain"
    result = kiln(["train", *_flags(ref, corpus, 6)], env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    for i, (n, layout, last) in enumerate(CHAIN):
        args = ["train", *_flags(run, corpus, last), *layout, *(["--resume"] if i else [])]
        result = kiln(args, env, timeout=600) if n == 1 else torchrun(n, args, env)
        assert result.returncode == 0, (layout, result.stderr[-3000:])
        if i:
            assert f"step-{last - 2:07d}" in result.stdout, layout
        assert read_meta(run / f"checkpoints/step-{last:07d}")["world_size"] == n, layout

    np.testing.assert_allclose(_losses(run), _losses(ref), rtol=1e-5, atol=0)
    a = read_tensors(ref / "checkpoints/step-0000006")
    b = read_tensors(run / "checkpoints/step-0000006")
    compared = [k for k in a if k.startswith(("model.", "optim.state."))]
    assert any("experts.w1" in k and k.endswith("exp_avg_sq") for k in compared)
    assert torch.any(a["model.blocks.0.mlp.router.expert_bias"] != 0)
    for key in compared:
        diff = (a[key].float() - b[key].float()).abs().max().item()
        assert diff <= 1e-5, (key, diff)
