"""`kiln estimate-memory` under expert parallelism agrees with the measured peak of real
training steps: EP2 on 2 gloo ranks under DDP, each rank holding 4 of 8 experts
(kiln.train.memory_probe; see tests/distributed/test_memory_estimate.py for the dense
layouts)."""

import pytest

from kiln.config import MoEConfig, ParallelConfig
from kiln.models.gpt import GPTConfig
from kiln.train.memory import estimate_layout_memory
from kiln.train.memory_probe import Probe, measure_peaks

# the routed experts are most of the model (8.4M of 8.6M parameters), so an estimate that did
# not split them over the ep ranks would be far off
SHAPE = GPTConfig(
    n_layers=2, d_model=128, n_heads=2, n_kv_heads=2, d_head=64, d_ffn=256, vocab_size=512,
    max_seq_len=64, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True, moe=MoEConfig(experts=8, top_k=2, d_expert=2048, kernel="grouped"),
)  # fmt: skip
# kernel "grouped", the kernel the estimate models: with "auto" the peak also held whatever the
# kernel chooser's timing run left behind, or not when an earlier run had cached the choice
# FSDP2 with dp = ep leaves the experts whole, as DDP does. Under kiln's default kept heap the
# busier rank measured 0.97-1.14 (DDP) and 0.86-1.05 (FSDP2) of the estimate in 8 runs on an AMD
# EPYC; the estimate had counted the kept heap twice before (0.70-0.90)
LAYOUTS = {"ddp ep2": ParallelConfig(expert=2, data="ddp"),
           "fsdp ep2": ParallelConfig(expert=2, data="fsdp")}  # fmt: skip


@pytest.mark.timeout(300)
def test_expert_parallel_estimates_within_25_percent_of_measured_peaks():
    batch, seq = 8, 64
    probes = [Probe(SHAPE, cfg, 2, batch, seq) for cfg in LAYOUTS.values()]
    for (name, cfg), measured in zip(LAYOUTS.items(), measure_peaks(probes)):
        (est,) = estimate_layout_memory(SHAPE, seq, batch // 2, "fp32", 2, cfg)
        assert est.layout.endswith("ep2")
        # the estimate is the busiest rank's: routing sends the ranks' experts uneven numbers
        # of rows (the other rank measured 0.1-0.2 lower)
        ratios = [m / est.peak_with_build for m in measured]
        assert 0.75 <= max(ratios) <= 1.25 and min(ratios) > 0.5, (name, ratios, measured)
