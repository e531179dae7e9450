"""One MoE run carried EP2 (steps 1-2, torchrun, 2 processes) → EP1 (3-4, one process) → EP2
(5-6, torchrun) through ``kiln train --resume`` with a new ``--parallel.expert``, against an
uninterrupted one-process run: every step's loss, every parameter, the routers' expert bias and
both AdamW moments at the end within 1e-5 (relative for the losses).

The tiny MoE (4 experts, top-2, aux loss, z-loss and the expert-bias update) keeps one
micro-batch of 4 sequences everywhere (two accumulated in one process, one per rank under EP2),
so the balancing losses and the expert loads see the same tokens in every layout. Constant LR
after warm-up, so runs of any length share one schedule."""

import pytest
import torch

from tests.distributed.conftest import chain_equals_uninterrupted
from tests.e2e.helpers import tiny_flags

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


@pytest.mark.timeout(900)  # four launches, two of them 2-process torchrun
def test_ep2_to_ep1_to_ep2_resumes_equal_to_an_uninterrupted_run(tmp_path, corpus, kiln_env):
    env = dict(kiln_env, OMP_NUM_THREADS="1")
    a = chain_equals_uninterrupted(tmp_path, CHAIN, lambda r, last: _flags(r, corpus, last), env)
    assert any("experts.w1" in k and k.endswith("exp_avg_sq") for k in a)
    assert torch.any(a["model.blocks.0.mlp.router.expert_bias"] != 0)
