"""`kiln estimate-memory`'s report: the per-rank table and the estimates for a job — its own
``parallel`` layout (one column per pipeline rank), or one process, or DDP and FSDP2 without
and with activation checkpointing. The arithmetic is :mod:`kiln.train.memory`'s."""

from __future__ import annotations

import torch

from kiln.train.memory import MemoryEstimate, estimate_layout_memory


def format_table(estimates: list[MemoryEstimate]) -> str:
    """One column per estimate, one row per component, in MiB."""
    heads = [
        e.layout or f"{e.data}×{e.world_size}{' +AC' if e.activation_checkpointing else ''}"
        for e in estimates
    ]
    width = max(12, *(len(h) + 2 for h in heads))
    lines = ["per-rank memory (MiB)".ljust(28) + "".join(h.rjust(width) for h in heads)]
    labels = max((e.rows() for e in estimates), key=len)
    for label, _ in labels:
        values = [dict(e.rows()).get(label) for e in estimates]
        cells = "".join(("-" if b is None else f"{b / 2**20:,.1f}").rjust(width) for b in values)
        lines.append(f"  {label}".ljust(28) + cells)
    return "\n".join(lines)


def estimate_for_job(
    job, world_size: int, layout: bool = False
) -> tuple[str, list[MemoryEstimate]]:
    """(description, estimates) for a JobConfig at ``world_size``: with ``layout``, the job's
    ``parallel`` section (one column per pipeline rank); else one process, or DDP and FSDP2,
    each without and with activation checkpointing. The vocabulary is data.vocab_size for a
    BPE tokenizer trained by Kiln (nothing is tokenised here), else the preset's."""
    from kiln.models.presets import resolve_model

    vocab = job.data.vocab_size if job.data.tokenizer == "bpe" else None
    shape, _ = resolve_model(job.model, vocab)
    if job.data.seq_len > shape.max_seq_len:
        from kiln.errors import ConfigError

        raise ConfigError(
            f"data.seq_len {job.data.seq_len} exceeds the model's context "
            f"(max_seq_len {shape.max_seq_len}); lower data.seq_len or raise model.max_seq_len."
        )
    job.validate(world_size)
    micro = job.train.micro_batch_size or job.train.batch_size // world_size
    modes = ["ddp", "fsdp"] if world_size > 1 else ["none"]
    device = job.run.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from kiln.planning.hardware import resolve_precision

    precision, _ = resolve_precision(job.train.precision, device)
    if layout:
        estimates = _job_layout(shape, job, precision, world_size, device)
        cfg = job.parallel
        if cfg.pipeline > 1:  # the schedule's micro-batch
            from kiln.distributed.pipeline import stages_per_rank

            m = cfg.microbatches or cfg.pipeline * stages_per_rank(
                cfg.pipeline_schedule, cfg.stages_per_rank
            )
            micro = job.train.batch_size // (world_size // (cfg.tensor * cfg.pipeline)) // m
        return _describe(shape, job, micro, precision, world_size), estimates
    from kiln.config import ParallelConfig

    local = job.train.batch_size // world_size
    estimates = [
        estimate_layout_memory(shape, job.data.seq_len, local, precision, world_size,
                               ParallelConfig(data="fsdp" if m == "none" else m,
                                              activation_checkpointing=ac), micro, device)[0]
        for m in modes
        for ac in (False, True)
    ]  # fmt: skip
    return _describe(shape, job, micro, precision, world_size), estimates


def _describe(shape, job, micro: int, precision: str, world_size: int) -> str:
    n = shape.num_params(include_embeddings=True)
    active = shape.num_params(include_embeddings=True, active=True)
    count = f"{n:,}"
    if active != n:  # MoE: state for every expert, activations for the routed tokens
        count += f" (all experts; {active:,} active per token)"
    return (
        f"model: {count} parameters ({shape.n_layers} layers, d_model {shape.d_model}, vocab "
        f"{shape.vocab_size}); micro-batch {micro} × {job.data.seq_len} tokens, "
        f"{precision}, {world_size} rank(s)"
    )


def _job_layout(shape, job, precision: str, world: int, device: str) -> list[MemoryEstimate]:
    """The job's own layout, refused in one sentence as `kiln train` would refuse it."""
    from kiln.distributed.parallel_dims import ParallelDims
    from kiln.distributed.pipeline import check_pipeline, stages_per_rank
    from kiln.distributed.tensor_parallel import check_tensor_parallel
    from kiln.errors import ConfigError

    cfg = job.parallel
    dims = ParallelDims.from_config(cfg, 0, world, 0, torch.device("cpu"))  # checks degrees
    check_tensor_parallel(shape, dims.tp)
    check_pipeline(shape, dims.pp, cfg.pipeline_schedule, cfg.microbatches, cfg.stages_per_rank)
    local = job.train.batch_size // dims.dp_size
    if dims.pp > 1:
        m = cfg.microbatches or dims.pp * stages_per_rank(cfg.pipeline_schedule,
                                                           cfg.stages_per_rank)  # fmt: skip
        if local % m:
            raise ConfigError(
                f"parallel.microbatches {m} does not divide the {local} sequences each "
                "pipeline gets per step; choose a divisor of it."
            )
    return estimate_layout_memory(shape, job.data.seq_len, local, precision, world, cfg,
                                  job.train.micro_batch_size, device)  # fmt: skip
