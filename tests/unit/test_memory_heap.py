"""The kept-heap term of the layout memory estimate: on a CPU with kiln's default malloc tuning
(freed memory kept in the heap) the peak adds HEAP_KEPT_TRANSIENT × the step's transient bytes;
with KILN_MALLOC_TUNING=memory, on a GPU, or with heap_kept=False it does not, and the planner
predicts for the tuning in force."""

from __future__ import annotations

import pytest

from kiln.config import ParallelConfig
from kiln.models.gpt import GPTConfig
from kiln.planning.flops import Shape
from kiln.planning.layout import Layout, layout_memory
from kiln.train.memory import FSDP_CPU_EXTRA, HEAP_KEPT_TRANSIENT, estimate_layout_memory
from kiln.train.memory_report import format_table

SHAPE = GPTConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_ffn=256,
                  vocab_size=512, max_seq_len=32, tie_embeddings=False)  # fmt: skip
SEQ = 32
LAYOUTS = [ParallelConfig(data="ddp"), ParallelConfig(), ParallelConfig(tensor=2),
           ParallelConfig(pipeline=2, pipeline_schedule="1F1B", microbatches=4)]  # fmt: skip


@pytest.mark.parametrize("cfg", LAYOUTS, ids=["ddp", "fsdp", "tp2", "pp2 1f1b"])
def test_kept_heap_adds_a_fraction_of_the_transient_bytes(cfg):
    kept = estimate_layout_memory(SHAPE, SEQ, 8, "fp32", 2, cfg, heap_kept=True)
    live = estimate_layout_memory(SHAPE, SEQ, 8, "fp32", 2, cfg, heap_kept=False)
    for k, e in zip(kept, live):
        assert e.heap == 0 and k.heap > 0
        fsdp = k.grads - e.grads  # FSDP2's fragmentation term, counted apart
        assert fsdp == (FSDP_CPU_EXTRA * (k.params - e.params) if cfg.data == "fsdp" else 0)
        assert k.heap == int(HEAP_KEPT_TRANSIENT * e.transient)
        assert k.peak == e.peak + k.heap + 2 * fsdp
        assert k.transient > k.heap  # the term is a fraction of what the step frees
    assert "kept heap (CPU malloc)" in format_table(kept)
    assert "kept heap" not in format_table(live)


def test_no_kept_heap_on_a_gpu_or_when_malloc_returns_memory(monkeypatch):
    cfg = ParallelConfig(data="ddp")
    (gpu,) = estimate_layout_memory(SHAPE, SEQ, 8, "fp32", 2, cfg, device="cuda")
    assert gpu.heap == 0
    monkeypatch.setenv("KILN_MALLOC_TUNING", "memory")
    (returned,) = estimate_layout_memory(SHAPE, SEQ, 8, "fp32", 2, cfg)
    assert returned.heap == 0
    monkeypatch.setenv("KILN_MALLOC_TUNING", "1")
    (default,) = estimate_layout_memory(SHAPE, SEQ, 8, "fp32", 2, cfg)
    assert default.heap == int(HEAP_KEPT_TRANSIENT * returned.transient) > 0


def test_planner_cpu_prediction_includes_the_kept_heap():
    shape = Shape(n_layers=4, d_model=64, n_heads=4, d_ffn=256, vocab_size=512, max_seq_len=32,
                  tie_embeddings=False)  # fmt: skip
    lay = Layout(1, 1, 2, 1, 8, 1, "1F1B", 1, False, "ddp")
    cpu = layout_memory(shape, lay, SEQ, "fp32", "cpu")
    gpu = layout_memory(shape, lay, SEQ, "fp32", "cuda")
    assert gpu["heap"] == 0 and cpu["heap"] > 0
    assert cpu["peak"] == pytest.approx(gpu["peak"] + cpu["heap"])
