"""``kiln train``: config → plan → model → parallelize → train loop → checkpoint/metrics.

:func:`run_training` runs the data flow of one run, each step a named function below: resolve
the config (and which checkpoint ``--resume`` names) → the run directory
(kiln.train.run_dir) → data, model shape and plan → the model built and parallelized → optimizer,
LR schedule, loader and callbacks (each built from its own config section) → the
:class:`kiln.train.trainer.Trainer`, its state restored through the registry of stateful parts
(kiln.train.state) → fit → summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.config import JobConfig
from kiln.distributed.materialize import meta_model
from kiln.distributed.parallel_dims import (
    ParallelDims,
    RankFailure,
    failure_detail,
    init_distributed,
    looks_like_rank_failure,
    shutdown,
)
from kiln.distributed.parallelize import Parallelized, check_layout, parallelize_model
from kiln.errors import ConfigError
from kiln.fsio import atomic_write
from kiln.models.cpu_attention import apply_cpu_attention
from kiln.models.fused_mlp import apply_fused_mlp
from kiln.models.gpt import GPT, Attention, GPTConfig
from kiln.models.presets import resolve_model
from kiln.planning.hardware import measure_cpu_peak, resolve_precision
from kiln.train import checkpoint as ckpt
from kiln.train.callbacks import Callback
from kiln.train.malloc import keep_freed_memory, returns_freed_memory
from kiln.train.metrics import MetricsWriter, plot_loss, truncate_metrics
from kiln.train.optim import LRSchedule, Optimizers, build_optimizer
from kiln.train.plan import TrainingPlan, make_training_plan
from kiln.train.run_dir import prepare_run_dir, provenance, resolve_resume, write_run_files
from kiln.train.state import checkpoint_saver, restore_run, run_facts, training_state
from kiln.train.trainer import Hooks, Trainer


def build_model(shape: GPTConfig, device: torch.device, seed: int) -> GPT:
    """Build on the meta device, then materialise and initialise deterministically."""
    with torch.device("meta"):
        model = GPT(shape)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _lr_multiplier(shape: GPTConfig, parametrization: str):
    if parametrization != "mup":
        return None
    from kiln.models.mup import lr_multiplier

    return lr_multiplier(shape)


def run_training(job: JobConfig, resume: str | None = None, given: Iterable[str] = ()) -> dict:
    """Train ``job`` (or resume the run in ``job.run.dir``); return summary.json's content.

    ``resume``: None (a new run), 'latest', 'auto' or a checkpoint (see :func:`resolve_resume`);
    ``given``: the ``section.field`` names the command line set (flags and --config files).
    Under torchrun a collective that fails (a rank died, or stayed silent past
    ``parallel.timeout_s``) becomes a :class:`RankFailure` with one readable sentence.
    """
    dims = init_distributed(job.parallel, job.run.device)
    try:
        return _run(job, resume, set(given), dims)
    except RuntimeError as exc:  # gloo raises RuntimeError, NCCL/c10d DistError (a subclass)
        if dims.distributed and looks_like_rank_failure(exc):
            raise RankFailure(
                f"rank {dims.rank} of {dims.world_size} lost contact with the other ranks "
                f"({failure_detail(exc)}); the job stops here — fix or replace the failed "
                f"rank and continue with --resume from the newest checkpoint in {job.run.dir}."
            ) from exc
        raise
    finally:
        shutdown(abort=sys.exc_info()[0] is not None)


def _run(job: JobConfig, resume: str | None, given: set[str], dims: ParallelDims) -> dict:
    """The data flow of one run: config → run dir → data + shape + plan → model (parallelized)
    → optimizer, loader, callbacks → trainer (restored) → fit → summary."""
    started = time.perf_counter()
    log = print if dims.is_main else (lambda *_: None)
    job, resuming, latest = resolve_job(job, resume, given, dims, log)
    run_dir = prepare_run_dir(job, resuming, dims)
    config_text = yaml.safe_dump(job.to_dict(), sort_keys=False)  # as asked: 'auto' stays auto
    job = settle_precision(job, dims, log)
    data, shape, plan = plan_run(job, dims, run_dir, log)
    if dims.is_main and latest is None:  # a new run, or a restart from step 0
        write_run_files(run_dir, config_text, data.tokenizer, provenance(dims, shape))
    built, compile_whole = build_parallel_model(job, shape, dims, log)
    optimizer, schedule = build_optimizer_and_schedule(job, shape, plan, built.model_parts)
    loader, vals = build_loaders(job, data, dims)
    callbacks = build_callbacks(job, built.model_parts[0], optimizer, log)
    trainer = build_trainer(job, plan, dims, built, optimizer, schedule, loader, vals, callbacks,
                            compile_whole)  # fmt: skip
    state = training_state(built.model_parts, optimizer, trainer)
    shape_dict = dataclasses.asdict(shape)
    if latest is not None:
        restore_run(latest, shape_dict, state, trainer, log)
    if dims.is_main:  # only after the checkpoint proved loadable: a bad one changes nothing
        if resuming:
            truncate_metrics(run_dir, trainer.state.step)
        for name in ckpt.clean_partial(run_dir / "checkpoints"):
            log(f"removed {name}, left by an interrupted checkpoint write")
    save = checkpoint_saver(state, trainer, run_dir / "checkpoints", job.checkpoint.keep,
                            run_facts(job, shape_dict, dims))  # fmt: skip
    fit(trainer, job, dims, run_dir, save, log)
    return finish_run(trainer, plan, data, started, job, dims, run_dir, log)


def resolve_job(
    job: JobConfig, resume: str | None, given: set[str], dims: ParallelDims, log
) -> tuple[JobConfig, bool, Path | None]:
    """(config to train, resuming?, checkpoint to load), validated for this layout."""
    job, resuming, latest = resolve_resume(job, resume, given, log)
    if resuming and latest is None:  # killed before its first checkpoint: same config, step 0
        log(f"{job.run.dir} has no complete checkpoint yet: restarting its run from step 0.")
    job.validate(dims.dp_size)
    return job, resuming, latest


def settle_precision(job: JobConfig, dims: ParallelDims, log) -> JobConfig:
    """``train.precision`` resolved ('auto' measured); under torchrun every rank takes rank 0's
    choice, so a close race between bf16 and fp32 cannot split the ranks."""
    precision, why = resolve_precision(job.train.precision, dims.device.type)
    if dims.distributed:
        choice = [precision, why]
        torch.distributed.broadcast_object_list(choice, src=0)
        precision, why = choice
    job.train = dataclasses.replace(job.train, precision=precision)
    log(f"precision: {precision} ({why})")
    return job


def plan_run(job: JobConfig, dims: ParallelDims, run_dir: Path, log):
    """(data, model shape, training plan): the corpus prepared, the shape resolved for its
    vocabulary, the plan printed, and room for a checkpoint checked."""
    from kiln.data import prepare_data

    data = prepare_data(job.data, log=log)
    shape, notes = resolve_shape(job, data.tokenizer.vocab_size)
    plan = make_training_plan(shape, job, dims, data)
    for note in notes:
        log(f"note: {note}")
    log(plan.describe())
    size = checkpoint_bytes(shape)
    ckpt.check_space(run_dir / "checkpoints", size, job.checkpoint.keep, log)
    return data, shape, plan


def resolve_shape(job: JobConfig, vocab_size: int) -> tuple[GPTConfig, list[str]]:
    """The model shape to train (preset + overrides, MoE, μP) and notes about it; refuses a
    shape this job cannot train."""
    shape, notes = resolve_model(job.model, vocab_size, job.moe)
    check_moe_job(job, shape)
    if job.model.parametrization == "mup":
        from kiln.models.mup import apply_mup

        shape = apply_mup(shape, job.model.mup_base_width)
    if job.data.seq_len > shape.max_seq_len:
        raise ConfigError(
            f"data.seq_len {job.data.seq_len} exceeds the model's context "
            f"(max_seq_len {shape.max_seq_len}); lower data.seq_len or raise model.max_seq_len."
        )
    return shape, notes


def settle_cpu_attention(model: GPT, job: JobConfig, micro_batch: int, dims: ParallelDims) -> str:
    """``train.cpu_attention`` applied ('auto' measured); under torchrun every rank takes rank
    0's choice (one attention kernel for the whole job)."""
    train = job.train
    said = apply_cpu_attention(
        model, train.cpu_attention, micro_batch, job.data.seq_len, train.precision, dims.device.type
    )
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if dims.distributed and layers:
        choice = [said, layers[0].matmul_attention]
        torch.distributed.broadcast_object_list(choice, src=0)
        said = choice[0]
        for layer in layers:
            layer.matmul_attention = choice[1]
    return said


def pin_thread_count() -> int:
    """Fix this process's CPU thread count for the whole run; returns it. torch only turns
    MKL's dynamic threading off when ``torch.set_num_threads`` is called, and with it on MKL may
    run a GEMM on fewer threads than asked at run time, which changes its summation order: two
    runs (or a run and its resume) then differ in the last bit. Intel's reproducibility
    conditions for MKL ask for a fixed thread count and MKL_DYNAMIC off; this gives both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def build_parallel_model(
    job: JobConfig, shape: GPTConfig, dims: ParallelDims, log
) -> tuple[Parallelized, bool]:
    """(the model built and parallelized for this layout, compile model + loss as one graph?)."""
    if dims.device.type == "cpu":
        pin_thread_count()
    if dims.device.type == "cpu" and keep_freed_memory():
        log(
            "memory: malloc reuses freed blocks instead of page-faulting them in every step "
            "(KILN_MALLOC_TUNING=0 turns this off)"
        )
    elif dims.device.type == "cpu" and returns_freed_memory():
        log("memory: malloc returns freed blocks to the kernel (KILN_MALLOC_TUNING=memory)")
    local_batch = job.train.batch_size // dims.dp_size
    check_layout(shape, job.parallel, dims, local_batch, job.sparsity.enabled)
    model = meta_model(shape)  # each rank allocates only its shards (parallelize_model)
    if job.train.fused_mlp != "off" and (job.sparsity.enabled or dims.distributed):
        raise ConfigError(
            f"train.fused_mlp is {job.train.fused_mlp!r} but the fused MLP applies only to dense "
            "single-process runs; set it to 'off' with sparsity or torchrun."
        )
    micro = job.train.micro_batch_size or local_batch
    tokens = micro * job.data.seq_len
    log(apply_fused_mlp(model, job.train.fused_mlp, tokens, job.train.precision))
    log(settle_cpu_attention(model, job, micro, dims))
    # One process: compile model + loss as one graph (the trainer does it). Under torchrun:
    # compile block by block before FSDP/DDP wrap them, as torchtitan does.
    compile_whole = job.train.compile and not dims.distributed
    compile_blocks = job.train.compile and dims.distributed
    built = parallelize_model(model, dims, job.parallel, compile_blocks, log, job.train.seed)
    if compile_whole:
        log("torch.compile: model and loss as one graph")
    return built, compile_whole


def build_optimizer_and_schedule(
    job: JobConfig, shape: GPTConfig, plan: TrainingPlan, model_parts: list
) -> tuple[Any, LRSchedule]:
    """One optimizer per model part (pipeline stage), and the LR schedule of the plan."""
    lr_mult = _lr_multiplier(shape, job.model.parametrization)
    optimizers = [build_optimizer(part, job.train, lr_mult) for part in model_parts]
    optimizer = optimizers[0] if len(optimizers) == 1 else Optimizers(optimizers)
    schedule = LRSchedule(
        job.train.lr, plan.warmup_steps, plan.steps, job.train.min_lr_ratio, job.train.decay
    )
    return optimizer, schedule


def build_loaders(job: JobConfig, data, dims: ParallelDims):
    """(this data-parallel rank's training loader, the fixed validation batches)."""
    from kiln.data import TokenLoader, val_batches

    loader = TokenLoader(
        data.train,
        job.data.seq_len,
        job.train.batch_size,
        job.train.seed,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp_size,
    )
    vals = val_batches(data.val, job.data.seq_len, job.train.batch_size, job.train.eval_batches)
    return loader, vals


def build_trainer(
    job: JobConfig,
    plan: TrainingPlan,
    dims: ParallelDims,
    built: Parallelized,
    optimizer,
    schedule: LRSchedule,
    loader,
    vals,
    callbacks: list[Callback],
    compile_whole: bool,
) -> Trainer:
    return Trainer(
        built,
        optimizer,
        schedule,
        loader,
        vals,
        job.train,
        plan,
        dims,
        log_every=job.log.every,
        checkpoint_every=job.checkpoint.every,
        progress=job.log.progress and dims.is_main,
        callbacks=callbacks,
        compile_loss=compile_whole,
    )


def fit(trainer: Trainer, job: JobConfig, dims: ParallelDims, run_dir: Path, save, log) -> None:
    """Train to the end of the plan, writing metrics (rank 0) and checkpoints."""
    metrics = MetricsWriter(run_dir, enabled=dims.is_main, tensorboard=job.log.tensorboard)
    trainer.hooks = Hooks(log=log, write_metrics=metrics.write, save_checkpoint=save)
    try:
        trainer.fit()
    finally:
        metrics.close()


def finish_run(
    trainer: Trainer, plan: TrainingPlan, data, started: float, job: JobConfig,
    dims: ParallelDims, run_dir: Path, log,
) -> dict[str, Any]:  # fmt: skip
    """summary.json and the loss plot (rank 0); returns the summary."""
    summary = _summary(trainer, plan, data, started)
    if dims.is_main and dims.device.type == "cpu":  # sharpen a CPU peak cached under load
        measure_cpu_peak(job.train.precision, refine=True)
    if dims.is_main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
        plot_loss(run_dir)
        _print_summary(summary, log)
    return summary


def checkpoint_bytes(shape: GPTConfig) -> int:
    """About a checkpoint's size on disk: each fp32 parameter with AdamW's two moments and step,
    and its param group's values, which the name-keyed (flattened) optimizer state stores per
    parameter (the model built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        params = list(GPT(shape).parameters())
    groups = len(params) * ckpt.GROUP_ENTRIES * ckpt.GROUP_ENTRY_BYTES
    return ckpt.state_bytes({"p": params}) * 3 + len(params) * ckpt.TENSOR_OVERHEAD + groups


def check_moe_job(job: JobConfig, shape: GPTConfig) -> None:
    """Refuse, in one sentence, MoE combinations this version cannot train."""
    ep = job.parallel.expert
    if ep > 1 and shape.moe is None:
        raise ConfigError(f"parallel.expert is {ep} but the model has no experts (moe.experts 0).")
    if ep > 1 and shape.moe.experts % ep != 0:
        raise ConfigError(
            f"moe.experts {shape.moe.experts} is not divisible by parallel.expert {ep}; choose "
            f"an expert-parallel degree that divides {shape.moe.experts}."
        )
    if shape.moe is not None and job.sparsity.enabled:
        raise ConfigError(
            "sparsity does not yet apply to MoE expert weights; train the MoE model dense "
            "(sparsity.level 0) or use a dense preset."
        )


def build_callbacks(job: JobConfig, model, optimizer, log) -> list[Callback]:
    """Optional components that join the training loop (see kiln.train.callbacks)."""
    callbacks: list[Callback] = []
    if model.config.moe is not None:
        from kiln.train.moe import MoEBalance

        callbacks.append(MoEBalance(model, copies=job.parallel.tensor))
    if job.sparsity.enabled:
        from kiln.sparsity.callback import Runtime, build_sparsity

        dp = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        micro = job.train.micro_batch_size or max(1, job.train.batch_size // dp)
        device = next(model.parameters()).device
        tokens = micro * job.data.seq_len
        runtime = Runtime(job.train.seed, job.train.max_steps, tokens, job.train.precision, device)
        callbacks.append(build_sparsity(job.sparsity, model, optimizer, runtime, log))
    return callbacks


def _summary(trainer: Trainer, plan: TrainingPlan, data, started: float) -> dict[str, Any]:
    return {
        "params": plan.params,
        "non_embedding_params": plan.non_embedding_params,
        "active_params": plan.active_params,
        "tokens": trainer.state.tokens,
        "flops": trainer.state.tokens * plan.flops_per_token,
        "steps": trainer.state.step,
        "skipped_steps": trainer.state.skipped_steps,
        "final_train_loss": trainer.final_train_loss,
        "final_val_loss": trainer.last_val_loss,
        "val_unigram_entropy": data.manifest.get("val_unigram_entropy_nats"),
        "wall_s": time.perf_counter() - started,
    }


def _print_summary(summary: dict[str, Any], log) -> None:
    val, uni = summary["final_val_loss"], summary["val_unigram_entropy"]
    log(
        f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
        f"{summary['wall_s']:.0f}s; "
        f"final train loss {summary['final_train_loss']:.3f}, val loss "
        f"{val if val is None else round(val, 3)}"
    )
    if val is not None and uni is not None and math.isfinite(val):
        gap = uni - val
        where = "below" if gap >= 0 else "above"
        log(
            f"validation unigram entropy {uni:.3f} nats; "
            f"the validation loss is {abs(gap):.3f} nats {where} it"
        )
