"""The ``parallel`` config section: data/tensor/pipeline/expert degrees and their options.
Re-exported by kiln.config."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import check_choice, check_positive

PIPELINE_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
                      "ZBVZeroBubble", "DualPipeV")  # fmt: skip
"""torch.distributed.pipelining's schedules, by the names its get_schedule_class takes."""


@dataclass
class ParallelConfig:
    """Parallel degrees, applied from outside the model (kiln.distributed)."""

    data: str = "fsdp"
    """Data parallelism under torchrun: 'fsdp' (FSDP2 fully_shard, ZeRO-3 style) or 'ddp'."""
    tensor: int = 1
    """Tensor-parallel degree (Megatron-style column/row sharding inside each block)."""
    pipeline: int = 1
    """Pipeline-parallel degree (the blocks cut into stages, one group of ranks per stage)."""
    sequence_parallel: bool = True
    """With parallel.tensor > 1, also split the norms and residual stream along the sequence."""
    pipeline_schedule: str = "1F1B"
    """With parallel.pipeline > 1: GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
    InterleavedZeroBubble, ZBVZeroBubble or DualPipeV (torch.distributed.pipelining)."""
    microbatches: int | None = None
    """Micro-batches per step in the pipeline (None = the number of stages)."""
    stages_per_rank: int | None = None
    """Pipeline stages one rank holds (None = 2 for the interleaved and V schedules, else 1)."""
    data_replicate: int = 1
    """Replicated data-parallel degree (HSDP: FSDP shards within, replicas across); the
    data-shard degree is what remains of the world size after tensor × pipeline × this."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    timeout_s: float = 300.0
    """Process-group timeout: a dead rank ends the job with an error after this long."""
    expert: int = 1
    """Expert-parallel degree: each MoE layer's experts are split over this many ranks."""
    cpu_offload: bool = False
    """Keep FSDP2's sharded parameters, gradients and optimizer state in host memory
    (CPUOffloadPolicy; the optimizer steps on the CPU). Always on for FSDP2 on a CPU."""

    def __post_init__(self) -> None:
        check_choice("parallel", "data", self.data, ["fsdp", "ddp"])
        check_positive("parallel", "timeout_s", self.timeout_s)
        check_positive("parallel", "expert", self.expert)
        for name in ("tensor", "pipeline", "data_replicate", "microbatches", "stages_per_rank"):
            check_positive("parallel", name, getattr(self, name))
        schedules = list(PIPELINE_SCHEDULES)
        check_choice("parallel", "pipeline_schedule", self.pipeline_schedule, schedules)
