"""The training loop in one process: gradient accumulation equals the big batch, non-finite steps
are skipped and counted, too many in a row stop the run, SIGTERM/SIGINT end it after a final
checkpoint."""

import math
import os
import signal

import numpy as np
import pytest
import torch
from tests.tiny_trainer import full_params, make_trainer

from kiln.config import TrainConfig
from kiln.train.callbacks import Callback
from kiln.train.trainer import TrainingStopped


def test_gradient_accumulation_equals_the_big_batch():
    """4 micro-batches of 2 give the losses and parameters of one batch of 8."""
    results = {}
    for micro in (8, 2):
        trainer, model, log = make_trainer(6, micro=micro)
        trainer.fit()
        results[micro] = ([r["loss"] for r in log["records"]], full_params(model))
    (big_losses, big), (acc_losses, acc) = results[8], results[2]
    np.testing.assert_allclose(acc_losses, big_losses, rtol=0, atol=1e-5)
    for name, value in big.items():
        torch.testing.assert_close(acc[name], value, rtol=0, atol=1e-5, msg=name)
    assert big_losses[-1] < big_losses[0]


class PoisonGrads(Callback):
    """Turns one gradient entry into NaN after the backward of the given (0-based) steps."""

    def __init__(self, model, steps):
        self.param, self.steps = next(model.parameters()), set(steps)

    def after_backward(self, step):
        if step in self.steps:
            self.param.grad.view(-1)[0] = math.nan


class PoisonWeights(Callback):
    """Makes a weight NaN after the optimizer step of ``step``: every later loss is NaN."""

    def __init__(self, model, step):
        self.param, self.step = next(model.parameters()), step

    def after_optimizer_step(self, step):
        if step == self.step:
            with torch.no_grad():
                self.param.view(-1)[0] = math.nan


def test_non_finite_gradient_skips_the_step_and_counts_it():
    snapshots = {}
    trainer, model, log = make_trainer(
        6, on_record=lambda r: snapshots.setdefault(r["step"], full_params(model))
    )
    trainer.callbacks.append(PoisonGrads(model, steps={2, 3}))  # logged steps 3 and 4
    state = trainer.fit()
    records = {r["step"]: r for r in log["records"]}
    assert [records[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert [math.isfinite(records[s]["grad_norm"]) for s in range(1, 7)] == [1, 1, 0, 0, 1, 1]
    for step in (3, 4):  # skipped: the parameters did not move
        for name, value in snapshots[2].items():
            assert torch.equal(snapshots[step][name], value), (step, name)
    assert any(not torch.equal(snapshots[5][n], v) for n, v in snapshots[4].items())
    assert (state.step, state.skipped_steps, state.consecutive_bad) == (6, 2, 0)
    assert log["checkpoints"] == [6]


@pytest.mark.parametrize("bad", ["loss", "grad_norm"])
def test_too_many_bad_steps_in_a_row_stop_the_run(bad):
    trainer, model, log = make_trainer(20, cfg=TrainConfig(precision="fp32", eval_every=0,
                                                          max_bad_steps=3))  # fmt: skip
    trainer.checkpoint_every = 2
    # logged steps 4, 5, 6 are bad: NaN weights after step 3 make every later loss NaN;
    # NaN gradients from step 4 on make the gradient norm NaN
    poison = PoisonWeights(model, 2) if bad == "loss" else PoisonGrads(model, range(3, 20))
    trainer.callbacks.append(poison)
    with pytest.raises(TrainingStopped, match="Stopped at step 6: 3 consecutive") as info:
        trainer.fit()
    assert "the last good checkpoint is step 4" in str(info.value)
    # the run raises before step 6's metrics line
    assert [math.isfinite(r[bad]) for r in log["records"]] == [1, 1, 1, 0, 0]
    assert [r["skipped_steps"] for r in log["records"]] == [0, 0, 0, 1, 2]
    assert log["checkpoints"] == [2, 4]  # no final checkpoint after the stop
    assert trainer.state.step == 6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_final_checkpoint_and_stops(sig):
    def send(record):
        if record["step"] == 3:
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    trainer, _, log = make_trainer(10, on_record=send)
    trainer.checkpoint_every = 2
    state = trainer.fit()
    assert state.step == 3 and [r["step"] for r in log["records"]] == [1, 2, 3]
    assert log["checkpoints"] == [2, 3]
    assert f"Received {sig.name} at step 3: saving a final checkpoint." in log["lines"]
    assert signal.getsignal(sig) is before  # the handler is put back
