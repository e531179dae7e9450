"""Typed configuration: one dataclass per section, validation next to the field it checks.

Every component receives only its own section. ``JobConfig`` gathers the sections for
``kiln train``; the CLI (jsonargparse) builds it from YAML files and ``--section.field`` flags,
and calls ``validate()`` for the checks that span sections. Nothing heavy is imported here.

The sections live in config_run.py (run, data, train, checkpoint, log), config_model.py
(model, moe), config_parallel.py and config_sparsity.py; this module gathers them into
``JobConfig`` and re-exports every name, so ``from kiln.config import TrainConfig`` works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kiln.config_model import MOE_ROUTERS, ModelConfig, MoEConfig
from kiln.config_parallel import PIPELINE_SCHEDULES, ParallelConfig
from kiln.config_run import CheckpointConfig, DataConfig, LogConfig, RunConfig, TrainConfig
from kiln.config_sparsity import SPARSE_DEFAULT_INCLUDE, SparsityConfig, _check_level, _parse_nm
from kiln.errors import ConfigError

__all__ = [
    "MOE_ROUTERS",
    "PIPELINE_SCHEDULES",
    "SECTIONS",
    "SPARSE_DEFAULT_INCLUDE",
    "CheckpointConfig",
    "DataConfig",
    "JobConfig",
    "LogConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RunConfig",
    "SparsityConfig",
    "TrainConfig",
    "_check_level",
    "_parse_nm",
    "job_config_from_dict",
]


@dataclass
class JobConfig:
    """Everything ``kiln train`` needs, one section per component."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def validate(self, dp_size: int = 1) -> None:
        """Checks that span sections (the per-field ones run when each section is built)."""
        t = self.train
        micro = t.micro_batch_size or max(1, t.batch_size // dp_size)
        if t.batch_size % (dp_size * micro) != 0:
            raise ConfigError(
                f"train.batch_size is {t.batch_size} but must be divisible by data-parallel size "
                f"{dp_size} × micro_batch_size {micro} = {dp_size * micro}."
            )
        self._validate_sparsity(dp_size)
        self._validate_experts(dp_size)
        if self.parallel.cpu_offload and (self.parallel.data != "fsdp" or dp_size == 1):
            raise ConfigError(
                f"parallel.cpu_offload needs parallel.data fsdp over at least 2 data-parallel "
                f"ranks (it is FSDP2's CPU offload) but data is {self.parallel.data} over "
                f"{dp_size}; turn it off or shard over more ranks."
            )

    def _validate_experts(self, dp_size: int) -> None:
        ep, experts = self.parallel.expert, self.moe.experts
        if ep > 1 and experts and experts % ep != 0:
            raise ConfigError(
                f"moe.experts {experts} is not divisible by parallel.expert {ep}; choose an "
                f"expert-parallel degree that divides {experts}."
            )
        if ep > 1 and dp_size % ep != 0:
            raise ConfigError(
                f"parallel.expert is {ep} but must divide the data-parallel size {dp_size}."
            )

    def _validate_sparsity(self, dp_size: int) -> None:
        sp = self.sparsity
        if not sp.enabled:
            return
        if dp_size > 1 and self.parallel.data == "fsdp":
            raise ConfigError(
                "sparsity with parallel.data fsdp is not supported yet; use --parallel.data ddp."
            )
        needs = {"gmp": "end_step", "set": "stop_step", "rigl": "stop_step", "spdf": "dense_step"}
        name = needs.get(sp.algorithm)
        if name and getattr(sp, name) is None and self.train.max_steps is None:
            raise ConfigError(
                f"sparsity.{name} defaults to 75% of train.max_steps, which is not set; "
                f"set --sparsity.{name} or --train.max_steps."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml holds)."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig)}


def job_config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build a JobConfig from a nested dict (a saved config.yaml), rejecting unknown keys."""
    from kiln.errors import closest

    sections = {}
    known = {f.name: f for f in dataclasses.fields(JobConfig)}
    for name, values in (raw or {}).items():
        if name not in known:
            raise ConfigError(f"Unknown config section {name!r}{closest(name, known)}.")
        cls = known[name].default_factory
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values or {}:
            if key not in fields:
                raise ConfigError(f"Unknown config key {name}.{key}{closest(key, fields)}.")
        sections[name] = cls(**(values or {}))
    return JobConfig(**sections)
