"""The layout memory estimate under a pipeline with activation checkpointing: a micro-batch in
flight keeps only its blocks' inputs; the block being recomputed for its backward holds its full
activations once per rank, not once per micro-batch in flight."""

from __future__ import annotations

from kiln.config import ParallelConfig
from kiln.distributed.pipeline import stage_layers
from kiln.models.gpt import GPTConfig
from kiln.train.memory import activation_bytes, estimate_layout_memory

SHAPE = GPTConfig(n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_ffn=256,
                  vocab_size=128, max_seq_len=32, tie_embeddings=False)  # fmt: skip
SEQ, MB = 32, 2


def _rank0_activations(microbatches: int) -> int:
    cfg = ParallelConfig(pipeline=2, pipeline_schedule="GPipe", microbatches=microbatches,
                         activation_checkpointing=True)  # fmt: skip
    est = estimate_layout_memory(SHAPE, SEQ, MB * microbatches, "fp32", 2, cfg)
    assert est[0].in_flight == microbatches  # GPipe: every micro-batch in flight
    return est[0].activations


def test_checkpointed_pipeline_keeps_block_inputs_per_microbatch_and_one_recompute():
    stage0 = SHAPE.replace(n_layers=len(stage_layers(SHAPE.n_layers, 2, 0)))
    common = dict(embedding=True, head=False, transient=False)
    kept = activation_bytes(stage0, MB, SEQ, "fp32", True, **common, recompute=False)
    whole = activation_bytes(stage0, MB, SEQ, "fp32", True, **common)
    assert whole > 2 * kept  # the recompute transient is not negligible here
    assert _rank0_activations(8) - _rank0_activations(4) == 4 * kept
    assert _rank0_activations(4) == 4 * kept + (whole - kept)
