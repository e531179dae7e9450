"""The run directory: what may be created, resumed or replaced there, which checkpoint
``--resume`` names, and the files that make a run reproducible (config.yaml, run.json).

``kiln train`` never mixes two runs in one directory: a new run refuses a directory that holds
one (unless ``run.overwrite``), and ``--resume`` refuses a command line that would change the
saved run (only :data:`CHANGEABLE_ON_RESUME` may differ).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln import __version__
from kiln.config import JobConfig, ParallelConfig, job_config_from_dict
from kiln.distributed.parallel_dims import ParallelDims
from kiln.errors import CheckpointError, ConfigError
from kiln.fsio import atomic_write
from kiln.models.gpt import GPTConfig
from kiln.train import checkpoint as ckpt

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


def provenance(dims: ParallelDims, shape: GPTConfig) -> dict[str, Any]:
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


def write_run_files(run_dir: Path, config_text: str, tokenizer, run_info: dict[str, Any]) -> None:
    """What makes a new run reproducible: its resolved config, tokenizer and provenance."""
    atomic_write(run_dir / "config.yaml", config_text)
    tokenizer.save(run_dir)
    atomic_write(run_dir / "run.json", json.dumps(run_info, indent=2))
