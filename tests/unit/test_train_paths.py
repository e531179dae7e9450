"""The default training path and its options in one process, on the real loop (Trainer) with
Kiln's AdamW: bf16 autocast trains, and follows fp32; activation checkpointing recomputes each
block and changes no number. (--train.compile: tests/e2e/test_train_compile.py, through kiln
train; bf16 through kiln train with an exact resume: tests/e2e/test_train_bf16.py.)"""

import numpy as np
import pytest
import torch
from tests.tiny_trainer import full_params, make_trainer

from kiln.config import TrainConfig

STEPS = 12


def _run(**kw) -> tuple[list[float], dict, torch.nn.Module]:
    precision = kw.pop("precision", "fp32")
    cfg = TrainConfig(precision=precision, eval_every=0, lr=1e-2, weight_decay=0.1)
    trainer, model, log = make_trainer(STEPS, adamw=True, cfg=cfg, **kw)
    trainer.fit()
    return [r["loss"] for r in log["records"]], full_params(model), model


@pytest.fixture(scope="module")
def fp32():
    return _run()


def test_bf16_autocast_trains_and_follows_fp32(fp32):
    losses, _, _ = _run(precision="bf16")
    assert losses[-1] < losses[0] - 1.0, losses
    ref = fp32[0]
    assert losses != ref  # bf16 matmuls really ran
    np.testing.assert_allclose(losses, ref, rtol=0, atol=0.05)


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing(fp32):
    calls = []
    losses, params, model = _run(activation_checkpointing=True)
    ref_losses, ref_params, _ = fp32
    assert losses == ref_losses
    for name, value in ref_params.items():
        assert torch.equal(params[name], value), name
    # each step runs every block's attention twice: forward, and again in backward
    handle = model.blocks["0"].attn.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randint(0, 64, (2, 16))
    model(x, targets=x).backward()
    handle.remove()
    assert len(calls) == 2
