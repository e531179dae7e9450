"""Typed configuration: one dataclass per section, validation next to the field it checks.

Every component receives only its own section. ``JobConfig`` gathers the sections for
``kiln train``; the CLI (jsonargparse) builds it from YAML files and ``--section.field`` flags,
and calls ``validate()`` for the checks that span sections. Nothing heavy is imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ConfigError, check_choice, check_positive


@dataclass
class RunConfig:
    """Where a run lives and what it may do to that place."""

    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/, plots/, tb/."""
    overwrite: bool = False
    """Allow starting a new run in a directory that already holds a different run."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""

    def __post_init__(self) -> None:
        check_choice("run", "device", self.device, ["auto", "cpu", "cuda"])
        if not self.dir:
            raise ConfigError("run.dir is empty but must name a directory.")


@dataclass
class ModelConfig:
    """Model shape: a named preset, with any field overridable (None = take the preset's)."""

    preset: str = "tiny"
    """Named shape from kiln.models.presets (tiny, cerebras-gpt-111m ... cerebras-gpt-13b, ...)."""
    n_layers: int | None = None
    """Number of transformer blocks."""
    d_model: int | None = None
    """Residual stream width."""
    n_heads: int | None = None
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention when < n_heads; 1 = multi-query)."""
    d_head: int | None = None
    """Width of one attention head (default d_model / n_heads)."""
    d_ffn: int | None = None
    """Hidden width of the MLP."""
    max_seq_len: int | None = None
    """Longest context the model supports (size of the learned position table)."""
    position: str | None = None
    """'learned' (GPT-2/3) or 'rope' (Llama)."""
    norm: str | None = None
    """'layernorm' or 'rmsnorm'."""
    activation: str | None = None
    """'gelu' (exact, Cerebras-GPT), 'gelu_tanh' (GPT-2) or 'swiglu' (Llama)."""
    bias: bool | None = None
    """Biases in linear layers and norms."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output head."""
    parallel_block: bool | None = None
    """PaLM/GPT-J style: attention and MLP read the same normalised input and are summed."""
    rope_theta: float | None = None
    """RoPE base frequency."""
    parametrization: str = "sp"
    """'sp' (standard, GPT-2 init) or 'mup' (maximal update parametrization, Cerebras-GPT rules)."""
    mup_base_width: int = 256
    """μP base width: the width at which μP and standard parametrization coincide."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_ffn",
                     "max_seq_len", "mup_base_width"):
            check_positive("model", name, getattr(self, name))
        check_positive("model", "rope_theta", self.rope_theta)
        if self.position is not None:
            check_choice("model", "position", self.position, ["learned", "rope"])
        if self.norm is not None:
            check_choice("model", "norm", self.norm, ["layernorm", "rmsnorm"])
        if self.activation is not None:
            check_choice("model", "activation", self.activation, ["gelu", "gelu_tanh", "swiglu"])
        check_choice("model", "parametrization", self.parametrization, ["sp", "mup"])

    def overrides(self) -> dict[str, Any]:
        """The architecture fields set explicitly (not None), to apply on top of the preset."""
        skip = {"preset", "parametrization", "mup_base_width"}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }


@dataclass
class DataConfig:
    """Corpus, tokenizer and token windows."""

    corpus: str = "builtin:shakespeare"
    """'builtin:shakespeare', 'builtin:sotu', 'builtin:all', or comma-separated .txt/.jsonl paths
    or folders."""
    tokenizer: str = "bpe"
    """'bpe' (train a byte-level BPE on the corpus), a tokenizer.json, or a folder holding
    tokenizer.json or vocab.json + merges.txt (GPT-2 format)."""
    vocab_size: int = 4096
    """Vocabulary size when training a BPE tokenizer."""
    seq_len: int = 256
    """Tokens per training sequence (must not exceed the model's max_seq_len)."""
    val_fraction: float = 0.05
    """Fraction of the corpus (by document, at the end) held out for validation."""
    cache_dir: str = ""
    """Where tokenised shards are cached by content hash ('' = ~/.cache/kiln/data)."""

    def __post_init__(self) -> None:
        check_positive("data", "vocab_size", self.vocab_size)
        check_positive("data", "seq_len", self.seq_len)
        if self.vocab_size < 260:
            raise ConfigError(
                f"data.vocab_size is {self.vocab_size} but a byte-level BPE needs at least 260."
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(
                f"data.val_fraction is {self.val_fraction} but must be between 0 and 0.5."
            )
        if not self.corpus:
            raise ConfigError("data.corpus is empty but must name a corpus or a path.")


@dataclass
class TrainConfig:
    """Optimisation: batch, length, AdamW, LR schedule, precision."""

    batch_size: int = 32
    """Sequences per optimizer step, summed over data-parallel ranks (global batch)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank (None = batch_size / data-parallel size);
    gradient accumulation steps = batch_size / (dp size × micro_batch_size)."""
    max_steps: int | None = None
    """Optimizer steps. If unset, length comes from flops, else tokens_per_param × params."""
    flops: float | None = None
    """Training compute budget in FLOPs (used when max_steps is unset)."""
    tokens_per_param: float = 20.0
    """Tokens per parameter when neither max_steps nor flops is set (Chinchilla: 20)."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (Cerebras-GPT: 10%)."""
    warmup_steps: int | None = None
    """Linear warm-up steps (None = 5% of training, at least 1)."""
    decay: str = "cosine"
    """Decay after warm-up: 'cosine' or 'linear'."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not biases, norms or embeddings)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    precision: str = "bf16"
    """'bf16' (autocast, fp32 master weights) or 'fp32'."""
    compile: bool = False
    """Compile the model with torch.compile."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    eval_every: int = 100
    """Compute validation loss every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "max_steps", "flops", "tokens_per_param",
                     "lr", "eval_batches", "max_bad_steps"):
            check_positive("train", name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "eps"):
            check_positive("train", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio is {self.min_lr_ratio} but must be in [0, 1].")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} is {getattr(self, name)} but must be in [0, 1).")
        check_choice("train", "decay", self.decay, ["cosine", "linear"])
        check_choice("train", "precision", self.precision, ["bf16", "fp32"])


@dataclass
class CheckpointConfig:
    """When and how many checkpoints to keep."""

    every: int = 500
    """Save a checkpoint every this many steps (and always at the end); 0 = only at the end."""
    keep: int = 3
    """Keep the newest this many complete checkpoints."""

    def __post_init__(self) -> None:
        check_positive("checkpoint", "every", self.every, allow_zero=True)
        check_positive("checkpoint", "keep", self.keep)


@dataclass
class LogConfig:
    """What is printed and written while training."""

    every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    tensorboard: bool = True
    """Write TensorBoard event files under RUN_DIR/tb."""

    def __post_init__(self) -> None:
        check_positive("log", "every", self.every)


@dataclass
class ParallelConfig:
    """Parallel degrees, applied from outside the model (kiln.distributed)."""

    data: str = "fsdp"
    """Data parallelism under torchrun: 'fsdp' (FSDP2 fully_shard, ZeRO-3 style) or 'ddp'."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    timeout_s: float = 300.0
    """Process-group timeout: a dead rank ends the job with an error after this long."""

    def __post_init__(self) -> None:
        check_choice("parallel", "data", self.data, ["fsdp", "ddp"])
        check_positive("parallel", "timeout_s", self.timeout_s)


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

    def validate(self, dp_size: int = 1) -> None:
        """Checks that span sections (the per-field ones run when each section is built)."""
        t = self.train
        micro = t.micro_batch_size or max(1, t.batch_size // dp_size)
        if t.batch_size % (dp_size * micro) != 0:
            raise ConfigError(
                f"train.batch_size is {t.batch_size} but must be divisible by data-parallel size "
                f"{dp_size} × micro_batch_size {micro} = {dp_size * micro}."
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
