"""`kiln estimate-memory` agrees with the peak memory of real training steps on this CPU: one
process, and DDP, FSDP2, TP2, PP2 GPipe (four micro-batches in flight) and PP2 1F1B (with
freed memory returned to the kernel) on 2 gloo ranks.

A fresh subprocess warms up torch's kernels on a small model (their one-off buffers go into the
baseline), records ru_maxrss, then runs three AdamW steps of a ~35M-parameter model the way the
trainer does (forward, backward, clip, step, zero_grad(set_to_none)). The increase of the peak
resident set must be within 25% of the estimate's peak.
"""

import json
import subprocess
import sys

import pytest

from kiln.config import ParallelConfig
from kiln.models.gpt import GPTConfig
from kiln.train.memory import estimate_layout_memory, estimate_memory
from kiln.train.memory_probe import Probe, measure_peaks
from tests.e2e.helpers import kiln

SHAPE = dict(
    n_layers=4, d_model=768, n_heads=12, n_kv_heads=12, d_head=64, d_ffn=3072,
    vocab_size=8192, max_seq_len=128, position="learned", norm="layernorm",
    activation="gelu", bias=True, tie_embeddings=True,
)  # fmt: skip
BATCH, SEQ = 4, 128

MEASURE = """
import json, resource, sys
import torch
from kiln.config import TrainConfig
from kiln.models.gpt import GPTConfig
from kiln.train.optim import build_optimizer
from kiln.train.run import build_model

torch.set_num_threads(2)
shape = GPTConfig(**json.loads(sys.argv[1]))
b, T = int(sys.argv[2]), int(sys.argv[3])
x, y = torch.randint(0, shape.vocab_size, (2, b, T))
warm = build_model(shape.replace(n_layers=1, d_model=64, n_heads=1, n_kv_heads=1, d_ffn=64),
                   torch.device("cpu"), 0)
warm(x, targets=y).backward()
del warm
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
model = build_model(shape, torch.device("cpu"), 0)
opt = build_optimizer(model, TrainConfig())
for _ in range(3):
    model(x, targets=y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"peak_delta": rss() - base}))
"""


def test_estimate_within_25_percent_of_measured_peak(kiln_env):
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(SHAPE), str(BATCH), str(SEQ)],
        capture_output=True, text=True, env=kiln_env, timeout=300, check=True,
    )  # fmt: skip
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_delta"]
    estimate = estimate_memory(GPTConfig(**SHAPE), BATCH, SEQ, precision="fp32").peak
    assert 0.75 <= measured / estimate <= 1.25, (measured / 2**20, estimate / 2**20)


def test_estimate_memory_prints_a_table(kiln_env):
    result = kiln(
        ["estimate-memory", "--model.preset", "cerebras-gpt-111m", "--data.tokenizer", "gpt2",
         "--data.seq_len", "2048", "--train.batch_size", "32", "--world-size", "8"],
        kiln_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "111,050,496 parameters" in result.stdout
    for label in ("ddp×8", "fsdp×8 +AC", "optimizer state (AdamW)", "activations", "peak"):
        assert label in result.stdout, label
    bad = kiln(["estimate-memory", "--world-size", "3"], kiln_env)
    assert bad.returncode == 2 and "divisible by data-parallel size 3" in bad.stderr


LAYOUT_SHAPE = GPTConfig(
    n_layers=4, d_model=192, n_heads=4, n_kv_heads=4, d_head=48, d_ffn=768, vocab_size=6144,
    max_seq_len=128, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=False,
)  # fmt: skip
LAYOUTS = {  # name: (layout, KILN_MALLOC_TUNING of the ranks)
    "ddp": (ParallelConfig(data="ddp"), "1"),
    "fsdp2": (ParallelConfig(), "1"),
    "tp2": (ParallelConfig(tensor=2), "1"),
    "pp2 gpipe": (ParallelConfig(pipeline=2, pipeline_schedule="GPipe", microbatches=4), "1"),
    # 1F1B frees and re-allocates activations between forwards and backwards: with the heap
    # kept its peak is 1.3-1.45x the live tensors (fragmentation); returned, it is what we count
    "pp2 1f1b": (ParallelConfig(pipeline=2, pipeline_schedule="1F1B", microbatches=4), "memory"),
}


@pytest.mark.timeout(900)  # five 2-process runs in one launch
def test_layout_estimates_within_25_percent_of_measured_peaks():
    """The busier rank's measured peak (ru_maxrss increase over kiln's own build → parallelize →
    Trainer.train_step path, kiln.train.memory_probe) is within 25% of the estimate for its
    pipeline rank (the estimate's peak or its build transient, whichever is higher), and every
    rank's within -35% / +25%, for the malloc tuning each run uses (heap kept: the estimate adds
    what the kept heap holds)."""
    batch, seq = 8, 128
    # six steps: the kept heap (and the estimate's HEAP_KEPT_TRANSIENT) settles over the first few
    probes = [Probe(LAYOUT_SHAPE, cfg, 2, batch, seq, malloc=m, steps=6)
              for cfg, m in LAYOUTS.values()]  # fmt: skip
    for (name, (cfg, malloc)), measured in zip(LAYOUTS.items(), measure_peaks(probes)):
        dp = 2 // (cfg.tensor * cfg.pipeline)
        est = estimate_layout_memory(LAYOUT_SHAPE, seq, batch // dp, "fp32", 2, cfg,
                                     heap_kept=malloc != "memory")  # fmt: skip
        want = [e.peak_with_build for e in est] * (2 // len(est))
        ratios = [m / e for m, e in zip(measured, want)]
        # with the heap kept, what a rank holds beyond its live tensors depends on how its frees
        # and allocations happen to interleave: the two ranks of one TP2 run measured 0.85 and
        # 0.74 in a clean-clone CI run. The estimate is the peak the busier rank reaches.
        assert 0.75 <= max(ratios) <= 1.25, (name, ratios, measured, want)
        assert all(0.65 <= r <= 1.25 for r in ratios), (name, ratios, measured, want)
