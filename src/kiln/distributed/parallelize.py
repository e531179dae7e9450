"""Apply parallelism to a plain GPT from outside, in order (as torchtitan does): tensor
parallel → activation checkpointing → compile → data parallel (FSDP2 or DDP). Each step is a
short function that says what it did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kiln.config import ParallelConfig
from kiln.distributed.parallel_dims import ParallelDims


def apply_activation_checkpointing(model: nn.Module, log: Callable[[str], None]) -> None:
    """Recompute each block's activations in backward (memory ↓, compute ≈ +1 forward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.blocks.items()):
        model.blocks[key] = checkpoint_wrapper(block)
    log(f"activation checkpointing: {len(model.blocks)} blocks")


def apply_compile(model: nn.Module, log: Callable[[str], None]) -> None:
    """Compile block by block (repeated structure compiles once and is re-used)."""
    for key, block in list(model.blocks.items()):
        model.blocks[key] = torch.compile(block)
    log("torch.compile: each transformer block")


def apply_fsdp(
    model: nn.Module, dims: ParallelDims, log: Callable[[str], None], offload: bool = False
) -> None:
    """FSDP2 (ZeRO-3 style): shard each block, then the root (embeddings, head); with
    ``offload`` the shards, their gradients and the optimizer state live in host memory. Under
    expert parallelism the experts (already split over ``ep``) are left out and stay whole on
    the ranks that share them, or sharded over those (``edp``) when there are several."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {}
    if dims.device.type == "cpu" or offload:
        # gloo has no reduce-scatter on device buffers; FSDP2 on CPU runs with CPU offload.
        from torch.distributed.fsdp import CPUOffloadPolicy

        # pinned host memory speeds up GPU copies; on a CPU there is nothing to copy
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dims.device.type != "cpu")
    # HSDP when there are replicas: shard within dp_shard, replicate across dp_replicate
    axes = ("dp_replicate", "dp_shard") if dims.dp_replicate > 1 else ("dp_shard",)
    if dims.ep > 1 and dims.dp_size > dims.ep:
        from kiln.distributed.expert_parallel import shard_experts_over_replicas

        shard_experts_over_replicas(model, dims.submesh("edp"), log, **kwargs)
    elif dims.ep > 1:
        from kiln.distributed.expert_parallel import data_parallel_ignores

        kwargs["ignored_params"] = data_parallel_ignores(model)[0]
    kwargs["mesh"] = dims.submesh(*axes)
    for block in model.blocks.values():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    replicas = f", replicated × {dims.dp_replicate} (HSDP)" if dims.dp_replicate > 1 else ""
    log(f"FSDP2: fully_shard over {dims.dp_shard} ranks{replicas}")


def apply_ddp(model: nn.Module, dims: ParallelDims, log: Callable[[str], None]) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if dims.ep > 1:
        from kiln.distributed.expert_parallel import data_parallel_ignores

        ignored = data_parallel_ignores(model)[1]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp = DistributedDataParallel(
        model,
        device_ids=[dims.device.index] if dims.device.type == "cuda" else None,
        process_group=dims.group("dp"),
    )
    log(f"DDP over {dims.dp_size} data-parallel ranks")
    return ddp


def shard(
    model: nn.Module,
    dims: ParallelDims,
    cfg: ParallelConfig,
    compile: bool,
    log: Callable[[str], None] = print,
) -> None:
    """Apply every in-place step of the layout to ``model`` (initialised or on meta): tensor
    parallel → expert parallel → activation checkpointing → compile → FSDP2/HSDP."""
    if dims.tp > 1:
        from kiln.distributed.tensor_parallel import apply_tensor_parallel

        # Under PP a later stage gets T / tp tokens and could not place its positions.
        sp = cfg.sequence_parallel and dims.pp == 1
        apply_tensor_parallel(model, dims.submesh("tp"), sp, log)
    if dims.ep > 1:
        from kiln.distributed.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, dims.submesh("ep"), log)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, log)
    if compile:
        apply_compile(model, log)
    if dims.dp_size > 1 and cfg.data != "ddp":
        apply_fsdp(model, dims, log, cfg.cpu_offload)


def data_parallel(
    model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, log: Callable[[str], None]
) -> nn.Module:
    """The module to train: a DDP wrapper around ``model`` (allocated), or ``model`` itself."""
    if dims.dp_size > 1 and cfg.data == "ddp":
        return apply_ddp(model, dims, log)
    return model


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    cfg: ParallelConfig,
    compile: bool,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """Return the module to train (the same object, or a DDP wrapper around it)."""
    shard(model, dims, cfg, compile, log)
    return data_parallel(model, dims, cfg, log)


def loss_component(dims: ParallelDims):
    """The loss the trainer (or the pipeline schedule) applies to the model's hidden states:
    loss-parallel under TP, else the fused chunked head + cross entropy."""
    if dims.tp > 1:
        from kiln.distributed.tensor_parallel import LossParallelHead

        return LossParallelHead(dims.submesh("tp"))
    return None


@dataclass
class Parallelized:
    """What training receives: the plain modules this rank holds (one per pipeline stage; what
    checkpoints save, with the parameter names of the whole model), the module the trainer
    calls, and the pipeline that drives the stages (None without PP)."""

    model_parts: list[nn.Module]
    train_model: nn.Module
    pipeline: object | None
    loss: object | None
    finish_grads: Callable[[], None] | None = None
    """Called after the last backward of a step, before clipping (expert gradients under
    expert parallelism); None when nothing needs it."""


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    cfg: ParallelConfig,
    compile: bool,
    log: Callable[[str], None] = print,
    seed: int | None = None,
) -> Parallelized:
    """Apply the whole layout to a GPT, in the documented order: pipeline cut → (per stage)
    tensor parallel → activation checkpointing → compile → FSDP2/HSDP or DDP.

    ``model`` is either initialised (every rank holds it whole), or — with ``seed`` — on the
    meta device: then the layout is applied there and each rank allocates only what it holds,
    initialised to the values ``seed`` gives the whole model (kiln.distributed.materialize)."""
    loss = loss_component(dims)
    if dims.pp == 1:
        parts, ids, n_stages = [model], [0], 1
    else:
        from kiln.distributed.pipeline import cut_stages

        parts, ids, n_stages = cut_stages(model, dims, cfg, log)
    for part in parts:
        shard(part, dims, cfg, compile, log)
    if seed is not None:
        from kiln.distributed.materialize import materialize

        materialize(parts, dims.device, seed)
    modules = [data_parallel(part, dims, cfg, log) for part in parts]
    if dims.pp == 1:
        finish = None
        if dims.ep > 1:
            from kiln.distributed.expert_parallel import ExpertGrads

            finish = ExpertGrads(model, dims, sharded=cfg.data == "fsdp")
        return Parallelized(parts, modules[0], None, loss, finish)
    from kiln.distributed.pipeline import make_pipeline
    from kiln.models.loss import head_loss

    pipeline = make_pipeline(parts, modules, ids, n_stages, dims, cfg, loss or head_loss)
    return Parallelized(parts, nn.ModuleList(modules), pipeline, loss)


def check_layout(shape, cfg: ParallelConfig, dims: ParallelDims, local_batch: int,
                 sparse: bool) -> None:  # fmt: skip
    """Refuse, before any training work, a layout that cannot run with this model and batch."""
    from kiln.distributed.pipeline import check_pipeline, stages_per_rank
    from kiln.distributed.tensor_parallel import check_tensor_parallel
    from kiln.errors import ConfigError

    check_tensor_parallel(shape, dims.tp)
    check_pipeline(shape, dims.pp, cfg.pipeline_schedule, cfg.microbatches, cfg.stages_per_rank)
    if sparse and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            "sparsity with parallel.tensor or parallel.pipeline > 1 is not supported yet; "
            "train sparse models with data parallelism only."
        )
    if getattr(shape, "moe", None) is not None and dims.pp > 1:
        raise ConfigError(
            "MoE models with parallel.pipeline > 1 are not supported yet; train them with "
            "data, expert or tensor parallelism."
        )
    if dims.pp > 1:
        n_micro = cfg.microbatches or dims.pp * stages_per_rank(
            cfg.pipeline_schedule, cfg.stages_per_rank
        )
        if local_batch % n_micro:
            raise ConfigError(
                f"parallel.microbatches {n_micro} does not divide the {local_batch} sequences "
                "each pipeline gets per step; choose a divisor of it."
            )
