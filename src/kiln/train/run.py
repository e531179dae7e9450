"""``kiln train``: config → plan → model → parallelize → train loop → checkpoint/metrics.

This module assembles the parts (each built from its own config section) and hands them to
:class:`kiln.train.trainer.Trainer`. It also owns the run directory: what may be created,
resumed or replaced there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln import __version__
from kiln.config import JobConfig, ParallelConfig, job_config_from_dict
from kiln.distributed.parallel_dims import (
    ParallelDims,
    RankFailure,
    failure_detail,
    init_distributed,
    looks_like_rank_failure,
    shutdown,
)
from kiln.distributed.parallelize import check_layout, parallelize_model
from kiln.errors import CheckpointError, ConfigError
from kiln.fsio import atomic_write
from kiln.models.fused_mlp import apply_fused_mlp
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.presets import resolve_model
from kiln.planning.hardware import measure_cpu_peak, resolve_precision
from kiln.train import checkpoint as ckpt
from kiln.train.callbacks import Callback, split_state
from kiln.train.malloc import keep_freed_memory
from kiln.train.metrics import MetricsWriter, plot_loss, truncate_metrics
from kiln.train.optim import LRSchedule, Optimizers, build_optimizer
from kiln.train.plan import TrainingPlan, make_training_plan
from kiln.train.trainer import Hooks, Trainer

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "tokenizer.json",
    "checkpoints",
    "plots",
    "tb",
    "run.json",
)


def load_run_config(run_dir: Path) -> JobConfig:
    """The resolved config a run directory was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no Kiln run (no config.yaml).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} does not parse as YAML ({_one_line(exc)}).") from exc
    return job_config_from_dict(raw)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:160]


# Fields a resumed run takes from the command line instead of its saved config.yaml: where the
# run lives and on which device, what it logs, how long it trains. The one list both --resume
# (a given flag outside it must equal the saved value) and --resume auto (is the directory's run
# this command's run?) read. The layout (parallel.*) always comes from the command that resumes:
# DCP reshards model and optimizer to it, and the loader's position is global.
CHANGEABLE_ON_RESUME = ("run.*", "log.*", "train.max_steps", "parallel.*")
LAYOUT_FIELDS = tuple(f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig))


def changeable_on_resume(name: str) -> bool:
    """True for a ``section.field`` a resumed run may take from the command line."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHANGEABLE_ON_RESUME)


def _flat(job: JobConfig) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in job.to_dict().items() for k, v in fields.items()}


def config_conflicts(
    saved: JobConfig, job: JobConfig, names: Iterable[str] | None = None
) -> list[tuple[str, Any, Any]]:
    """(field, saved value, given value) for each field of ``names`` (every field when None)
    that differs between the resolved configs and may not change on resume."""
    old, new = _flat(saved), _flat(job)
    keys = new if names is None else [n for n in names if n in new]
    return [
        (k, old.get(k), new[k])
        for k in keys
        if not changeable_on_resume(k) and old.get(k) != new[k]
    ]


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and prove a file can be written there (every rank, before
    any data or tokenizer work)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".kiln-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"run.dir {run_dir} cannot be written ({exc.strerror or exc}"
            f"{f': {exc.filename}' if exc.filename else ''}); choose a directory you can write."
        ) from exc


def prepare_run_dir(job: JobConfig, resume: bool, dims: ParallelDims) -> Path:
    """Create, or check, the run directory. Refuses to mix two different runs in one place."""
    run_dir = Path(job.run.dir)
    held = holds_run(run_dir)
    check_writable(run_dir)
    if resume:
        return run_dir
    if held and not job.run.overwrite:
        raise ConfigError(
            f"Run directory {run_dir} already holds a run; pass --resume to continue it or "
            "--run.overwrite true to replace it."
        )
    if dims.is_main and held:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if dims.distributed:
        torch.distributed.barrier()
    return run_dir


def resolve_resume(
    job: JobConfig, resume: str | None, given: Iterable[str], log
) -> tuple[JobConfig, bool, Path | None]:
    """(config to train, resuming?, checkpoint to load) for ``--resume`` MODE: None (a new
    run), 'latest' (bare --resume), 'auto', or a checkpoint (step-NNNNNNN or its path)."""
    run_dir = Path(job.run.dir)
    if resume is None:
        return job, False, None
    if resume == "auto" and not holds_run(run_dir):
        log(f"--resume auto: {run_dir} holds no run yet, so a new run starts.")
        return job, False, None
    if resume != "auto" and not holds_run(run_dir):
        raise CheckpointError(
            f"--resume was given but {run_dir} holds no run and "
            f"{run_dir / 'checkpoints'} no complete checkpoint."
        )
    saved = load_run_config(run_dir)
    names = None if resume == "auto" else set(given)
    _refuse_conflicts(run_dir, resume, config_conflicts(saved, job, names))
    # The run lives where it is now (it may have been moved or copied) and on the device this
    # process already chose; the changeable fields given come from the command line.
    for name in _flat(job) if names is None else {"run.dir", "run.device", *LAYOUT_FIELDS, *names}:
        if changeable_on_resume(name) and "." in name:
            section, field = name.split(".", 1)
            setattr(getattr(saved, section), field, getattr(getattr(job, section), field))
    return saved, True, _pick_checkpoint(run_dir, resume)


def _refuse_conflicts(run_dir: Path, resume: str, conflicts: list) -> None:
    if not conflicts:
        return
    name, old, new = conflicts[0]
    if resume == "auto":
        raise ConfigError(
            f"--resume auto: {run_dir} holds a different run ({name} is {old!r} there and "
            f"{new!r} in this command), so nothing was started or changed; give another "
            "--run.dir for a new run."
        )
    raise ConfigError(
        f"--resume continues the run saved in {run_dir}, whose {name} is {old!r}, so --{name} "
        f"{new!r} cannot be given (only {', '.join('--' + p for p in CHANGEABLE_ON_RESUME)} "
        "may change)."
    )


def _pick_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: the newest complete one, or the one given."""
    root = run_dir / "checkpoints"
    if resume in ("latest", "auto"):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:  # a damaged one is named before any data work
            ckpt.verify_checkpoint(latest)
        return latest
    given = root / resume if ckpt.STEP_DIR.match(resume) else Path(resume)
    found = ckpt.list_checkpoints(root)
    if given.resolve() not in [c.resolve() for c in found]:
        names = ", ".join(c.name for c in found) or "none"
        raise CheckpointError(
            f"--resume {resume} is not a complete checkpoint of the run in {run_dir}; "
            f"give 'auto', nothing (the newest), or one of: {names}."
        )
    ckpt.verify_checkpoint(given)
    return given


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
    from kiln.data import TokenLoader, prepare_data, val_batches

    started = time.perf_counter()
    log = print if dims.is_main else (lambda *_: None)
    job, resuming, latest = resolve_resume(job, resume, given, log)
    if resuming and latest is None:  # killed before its first checkpoint: same config, step 0
        log(f"{job.run.dir} has no complete checkpoint yet: restarting its run from step 0.")
    job.validate(dims.dp_size)
    run_dir = prepare_run_dir(job, resuming, dims)
    config_text = yaml.safe_dump(job.to_dict(), sort_keys=False)  # as asked: 'auto' stays auto
    precision, why = resolve_precision(job.train.precision, dims.device.type)
    if dims.distributed:  # every rank trains in rank 0's measured choice
        choice = [precision, why]
        torch.distributed.broadcast_object_list(choice, src=0)
        precision, why = choice
    job.train = dataclasses.replace(job.train, precision=precision)
    log(f"precision: {precision} ({why})")

    data = prepare_data(job.data, log=log)
    shape, notes = resolve_model(job.model, data.tokenizer.vocab_size, job.moe)
    check_moe_job(job, shape)
    if job.model.parametrization == "mup":
        from kiln.models.mup import apply_mup

        shape = apply_mup(shape, job.model.mup_base_width)
    if job.data.seq_len > shape.max_seq_len:
        raise ConfigError(
            f"data.seq_len {job.data.seq_len} exceeds the model's context "
            f"(max_seq_len {shape.max_seq_len}); lower data.seq_len or raise model.max_seq_len."
        )
    plan = make_training_plan(shape, job, dims, data)
    for note in notes:
        log(f"note: {note}")
    log(plan.describe())
    size = checkpoint_bytes(shape)
    ckpt.check_space(run_dir / "checkpoints", size, job.checkpoint.keep, log)

    if dims.is_main and latest is None:  # a new run, or a restart from step 0
        atomic_write(run_dir / "config.yaml", config_text)
        data.tokenizer.save(run_dir)
        atomic_write(run_dir / "run.json", json.dumps(_provenance(dims, shape), indent=2))

    if dims.device.type == "cpu" and keep_freed_memory():
        log(
            "memory: malloc reuses freed blocks instead of page-faulting them in every step "
            "(KILN_MALLOC_TUNING=0 turns this off)"
        )
    local_batch = job.train.batch_size // dims.dp_size
    check_layout(shape, job.parallel, dims, local_batch, job.sparsity.enabled)
    model = build_model(shape, dims.device, job.train.seed)
    if job.train.fused_mlp != "off" and (job.sparsity.enabled or dims.distributed):
        raise ConfigError(
            f"train.fused_mlp is {job.train.fused_mlp!r} but the fused MLP applies only to dense "
            "single-process runs; set it to 'off' with sparsity or torchrun."
        )
    tokens = (job.train.micro_batch_size or local_batch) * job.data.seq_len
    log(apply_fused_mlp(model, job.train.fused_mlp, tokens, job.train.precision))
    # One process: compile model + loss as one graph (the trainer does it). Under torchrun:
    # compile block by block before FSDP/DDP wrap them, as torchtitan does.
    compile_whole = job.train.compile and not dims.distributed
    compile_blocks = job.train.compile and dims.distributed
    built = parallelize_model(model, dims, job.parallel, compile_blocks, log=log)
    model_parts = built.model_parts
    model = model_parts[0]  # without PP, the one plain model (sparsity and callbacks use it)
    if compile_whole:
        log("torch.compile: model and loss as one graph")
    lr_mult = _lr_multiplier(shape, job.model.parametrization)
    optimizers = [build_optimizer(part, job.train, lr_mult) for part in model_parts]
    optimizer = optimizers[0] if len(optimizers) == 1 else Optimizers(optimizers)
    schedule = LRSchedule(
        job.train.lr, plan.warmup_steps, plan.steps, job.train.min_lr_ratio, job.train.decay
    )
    loader = TokenLoader(
        data.train,
        job.data.seq_len,
        job.train.batch_size,
        job.train.seed,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp_size,
    )
    vals = val_batches(data.val, job.data.seq_len, job.train.batch_size, job.train.eval_batches)

    callbacks = build_callbacks(job, model, optimizer, log)
    trainer = Trainer(
        built.train_model,
        optimizer,
        schedule,
        loader,
        vals,
        job.train,
        device=dims.device,
        total_steps=plan.steps,
        micro_batch_size=plan.micro_batch_size,
        seq_len=job.data.seq_len,
        global_batch=job.train.batch_size,
        flops_per_token=plan.flops_per_token,
        peak_flops=plan.peak_flops,
        world_size=dims.world_size,
        log_every=job.log.every,
        checkpoint_every=job.checkpoint.every,
        progress=job.log.progress and dims.is_main,
        callbacks=callbacks,
        compile_loss=compile_whole,
        dims=dims,
        loss=built.loss,
        pipeline=built.pipeline,
    )
    shape_dict = dataclasses.asdict(shape)

    def save() -> None:
        meta = {
            "tokens": trainer.state.tokens,
            "config_hash": ckpt.config_hash({k: v for k, v in job.to_dict().items() if k != "run"}),
            "model_shape": shape_dict,
            "world_size": dims.world_size,
            "layout": dims.degrees,
            "trainer": trainer.state.state_dict(),
            "loader": loader.state_dict(),
            "schedule": schedule.state_dict(),
            "callbacks": {},
        }
        extra = {"rng_cpu": torch.get_rng_state()}
        for cb in callbacks:
            extra[f"cb.{cb.name}"], meta["callbacks"][cb.name] = split_state(cb.state_dict())
        ckpt.save_checkpoint(
            run_dir / "checkpoints",
            trainer.state.step,
            model_parts,
            optimizer,
            meta,
            extra=extra,
            keep=job.checkpoint.keep,
        )

    if latest is not None:
        _restore(latest, shape_dict, model_parts, trainer, log)
    if dims.is_main:  # only after the checkpoint proved loadable: a bad one changes nothing
        if resuming:
            truncate_metrics(run_dir, trainer.state.step)
        for name in ckpt.clean_partial(run_dir / "checkpoints"):
            log(f"removed {name}, left by an interrupted checkpoint write")

    metrics = MetricsWriter(run_dir, enabled=dims.is_main, tensorboard=job.log.tensorboard)
    trainer.hooks = Hooks(log=log, write_metrics=metrics.write, save_checkpoint=save)
    try:
        trainer.fit()
    finally:
        metrics.close()
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


def _restore(latest, shape_dict, model, trainer: Trainer, log) -> None:
    """Load model, optimizer, counters, loader position, LR schedule, RNG and callback state."""
    optimizer, callbacks = trainer.optimizer, trainer.callbacks
    ckpt.verify_checkpoint(latest)  # a damaged one is named before anything else reads it
    meta = ckpt.read_meta(latest)
    if meta.get("model_shape") != shape_dict:
        raise CheckpointError(
            f"Checkpoint {latest} was saved for a different model shape; resume it with the "
            "config it was trained with."
        )
    extra = {"rng_cpu": torch.get_rng_state()}
    for cb in callbacks:  # current tensors are the templates DCP loads into
        extra[f"cb.{cb.name}"] = split_state(cb.state_dict())[0]
    ckpt.load_checkpoint(latest, model, optimizer, extra=extra)
    torch.set_rng_state(extra["rng_cpu"])
    for cb in callbacks:
        cb.load_state_dict({**extra[f"cb.{cb.name}"], **meta["callbacks"][cb.name]})
    trainer.state.load_state_dict(meta["trainer"])
    trainer.loader.load_state_dict(meta["loader"])
    # warm-up, peak and floor as saved; the total follows the (possibly extended) plan
    trainer.schedule.load_state_dict(meta["schedule"])
    log(f"resumed from {latest} (step {trainer.state.step}, {trainer.state.tokens:,} tokens)")


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
    if ep > 1:
        raise ConfigError(
            f"parallel.expert {ep} is not wired into kiln train yet (the expert-parallel "
            "module kiln.distributed.expert_parallel is tested on its own); use 1."
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

        callbacks.append(MoEBalance(model))
    if job.sparsity.enabled:
        from kiln.sparsity.callback import Runtime, build_sparsity

        dp = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        micro = job.train.micro_batch_size or max(1, job.train.batch_size // dp)
        device = next(model.parameters()).device
        tokens = micro * job.data.seq_len
        runtime = Runtime(job.train.seed, job.train.max_steps, tokens, job.train.precision, device)
        callbacks.append(build_sparsity(job.sparsity, model, optimizer, runtime, log))
    return callbacks


def _provenance(dims: ParallelDims, shape: GPTConfig) -> dict[str, Any]:
    import platform
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "kiln_version": __version__,
        "kiln_commit": commit,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(dims.device),
        "device_name": torch.cuda.get_device_name()
        if dims.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "world_size": dims.world_size,
        "model_shape": dataclasses.asdict(shape),
    }


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
