"""`kiln train --train.compile true` in one process: the model and its loss compile as one graph
(Dynamo → AOT autograd → Inductor's C++ kernels), the loss falls, and the losses follow the eager
run's. Cost: Inductor compiles the forward + backward graph and, for the final validation under
no_grad, the forward again; g++ spends ~4 CPU-s per generated kernel, almost all of it parsing
Inductor's C++ prelude, so the model is the smallest that still has every kind of layer
(1 block). A warm Inductor cache (a second run on the same machine) skips the C++ builds."""

import json

import numpy as np
import pytest
import torch

from kiln.cli import main
from tests.e2e.helpers import tiny_flags

STEPS = 4


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)  # the C++ builds of a cold Inductor cache, on a loaded machine
def test_compiled_training_follows_eager(tmp_path, corpus, cache_env, capsys):
    import torch._inductor.config

    # g++ in this process, one kernel after another: no pool of compile workers, each of which
    # would import torch first (the same kernels, built the same way). config.patch, not
    # monkeypatch: monkeypatch's undo deletes the option from the config module.
    with torch._inductor.config.patch(compile_threads=1):
        _compiled_training_follows_eager(tmp_path, corpus, capsys)


def _compiled_training_follows_eager(tmp_path, corpus, capsys):
    from torch._dynamo.utils import counters

    flags = lambda run: [*tiny_flags(run, corpus, steps=STEPS), "--model.n_layers", "1",
                         "--log.every", "1", "--train.eval_every", "0",
                         "--train.eval_batches", "1", "--checkpoint.every", "0",
                         "--log.tensorboard", "false"]  # fmt: skip
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["train", *flags(eager)]) == 0
    torch._dynamo.reset()
    counters.clear()
    try:
        assert main(["train", *flags(compiled), "--train.compile", "true"]) == 0
        graphs = counters["stats"]["unique_graphs"]
        lookups = ("fxgraph_cache_miss", "fxgraph_cache_hit", "fxgraph_cache_bypass")
        inductor = sum(counters["inductor"][k] for k in lookups)
    finally:
        torch._dynamo.reset()
    assert "torch.compile: model and loss as one graph" in capsys.readouterr().out
    # one graph for training, one for the validation under no_grad; Inductor built (or found
    # in its cache) the forward, backward and validation graphs
    assert graphs == 2 and inductor >= 3, (graphs, dict(counters["inductor"]))
    want, got = _losses(eager), _losses(compiled)
    assert len(got) == STEPS and got[-1] < got[0] - 0.3, got
    assert got != want  # Inductor's fused kernels round differently: the graph really ran
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
