"""`kiln train --train.precision bf16` (the default on a CPU with bf16 matmuls, and on GPUs)
end to end: the loss falls, and a run stopped by SIGTERM and continued with --resume ends
bitwise equal to one never stopped — every loss, every model and AdamW tensor."""

import itertools
import json
import os
import signal

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from kiln.cli import main
from kiln.models import cpu_attention
from kiln.models.gpt import GPT
from kiln.train import trainer as trainer_mod
from kiln.train.checkpoint import read_meta, read_tensors
from tests.e2e.helpers import tiny_flags

STEPS = 8


def _flags(run, corpus):
    return [*tiny_flags(run, corpus, steps=STEPS), "--train.precision", "bf16",
            "--model.n_layers", "1", "--checkpoint.every", "3", "--log.every", "1",
            "--train.eval_every", "0", "--train.eval_batches", "1",
            "--log.tensorboard", "false"]  # fmt: skip


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _autocast_of_each_forward() -> tuple[list, object]:
    """(list, hook handle): the list gets (autocast on?, its dtype) at every GPT forward."""
    seen = []

    def record(module, _args):
        if isinstance(module, GPT):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    return seen, register_module_forward_pre_hook(record)


@pytest.mark.timeout(600)  # three bf16 runs (emulated bf16 matmuls on CPUs without AVX512-BF16)
def test_bf16_trains_and_resumes_bitwise(tmp_path, corpus, cache_env, monkeypatch, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    # Timing the two attention paths would answer differently at every start here (as it can
    # on a loaded machine): the first answer, kept in $KILN_CACHE, must hold for every run.
    flips = itertools.cycle([True, False])
    monkeypatch.setattr(cpu_attention, "choose_cpu_attention",
                        lambda *a, **k: (next(flips), {"sdpa": 1.0, "matmul": 1.0}))  # fmt: skip
    seen, hook = _autocast_of_each_forward()
    try:
        assert main(["train", *_flags(ref, corpus)]) == 0
    finally:
        hook.remove()
    assert len(seen) >= STEPS and set(seen) == {(True, torch.bfloat16)}, set(seen)
    assert "precision: bf16 (train.precision bf16)" in capsys.readouterr().out
    losses = _losses(ref)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5, losses

    # SIGTERM arrives after step 5 (between the checkpoints of steps 3 and 6): the trainer
    # saves step 5 and stops; --resume continues from there.
    real = trainer_mod.crash_point
    stop_at_5 = lambda name: os.kill(os.getpid(), signal.SIGTERM) if name == "step:5" else None
    monkeypatch.setattr(trainer_mod, "crash_point", stop_at_5)
    assert main(["train", *_flags(run, corpus)]) == 0
    assert "Received SIGTERM at step 5" in capsys.readouterr().out
    assert read_meta(run / "checkpoints/step-0000005")["trainer"]["step"] == 5
    assert not (run / "checkpoints/step-0000006").exists()
    monkeypatch.setattr(trainer_mod, "crash_point", real)
    assert main(["train", "--run.dir", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out

    assert _losses(run) == losses
    a = read_tensors(ref / f"checkpoints/step-{STEPS:07d}")
    b = read_tensors(run / f"checkpoints/step-{STEPS:07d}")
    assert a.keys() == b.keys() and any(k.startswith("optim.state") for k in a)
    for name in a:
        assert a[name].dtype != torch.bfloat16, name  # fp32 master weights and moments
        assert torch.equal(a[name], b[name]), name
