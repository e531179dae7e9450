"""The config sections of a run's bookkeeping and training loop: ``run`` (where it lives),
``data`` (corpus and tokens), ``train`` (steps, optimiser, precision), ``checkpoint`` and
``log``. Re-exported by kiln.config."""

from __future__ import annotations

from dataclasses import dataclass

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
class DataConfig:
    """Corpus, tokenizer, token windows and how the corpus is prepared."""

    corpus: str = "builtin:shakespeare"
    """'builtin:shakespeare', 'builtin:sotu', 'builtin:all', or comma-separated paths, folders or
    globs (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, a saved datasets folder); a mixture
    gives every part a weight: 'builtin:shakespeare:0.7,builtin:sotu:0.3'."""
    text_field: str = "text"
    """The field (jsonl) or column (Parquet, datasets folder) that holds each document's text."""
    tokenizer: str = "bpe"
    """'bpe' (train a byte-level BPE on the corpus), a tokenizer.json, or a folder holding
    tokenizer.json or vocab.json + merges.txt (GPT-2 format)."""
    vocab_size: int = 4096
    """Vocabulary size when training a BPE tokenizer."""
    bpe_sample_mb: float = 256.0
    """MB of text the BPE tokenizer is trained on: the start of each corpus (split by weight)."""
    seq_len: int = 256
    """Tokens per training sequence (must not exceed the model's max_seq_len)."""
    val_fraction: float = 0.05
    """Fraction of the corpus (by document, at the end) held out for validation."""
    mixture_seed: int = 0
    """Seed choosing which documents a mixture repeats or leaves out to meet its weights."""
    cache_dir: str = ""
    """Where tokenised shards are cached by content hash ('' = ~/.cache/kiln/data)."""
    shard_mb: float = 64.0
    """MB of text per token shard: the unit that a killed preparation does not redo."""
    workers: int = 0
    """Threads tokenising in parallel while the corpus streams in (0 = every core)."""
    prepare_timeout_s: float = 3600.0
    """How long a process waits for another one (another rank or node) preparing the same data."""

    def __post_init__(self) -> None:
        check_positive("data", "vocab_size", self.vocab_size)
        check_positive("data", "seq_len", self.seq_len)
        for name in ("bpe_sample_mb", "shard_mb", "prepare_timeout_s"):
            check_positive("data", name, getattr(self, name))
        check_positive("data", "workers", self.workers, allow_zero=True)
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
        if not self.text_field:
            raise ConfigError("data.text_field is empty but must name a field or column.")
        self.components()

    def components(self) -> list[tuple[str, float | None]]:
        """The corpus as (spec, weight) parts: one unweighted part (its comma-separated sources
        concatenated), or the weighted components of a mixture, weights normalised to sum 1."""
        parts = [p.strip() for p in self.corpus.split(",") if p.strip()]
        weights: list[float | None] = []
        specs = []
        for part in parts:
            head, _, tail = part.rpartition(":")
            try:
                weight = float(tail) if head else None
            except ValueError:
                weight = None
            if weight is not None and not weight > 0:
                raise ConfigError(
                    f"data.corpus gives {head!r} the weight {tail} but a weight must be > 0."
                )
            specs.append(head if weight is not None else part)
            weights.append(weight)
        if all(w is None for w in weights):
            return [(",".join(parts), None)]
        if any(w is None for w in weights):
            bare = next(s for s, w in zip(specs, weights) if w is None)
            raise ConfigError(
                f"data.corpus mixes weighted and unweighted parts ({bare!r} has no weight); "
                "give every part a weight, e.g. 'builtin:shakespeare:0.7,builtin:sotu:0.3'."
            )
        total = sum(w for w in weights if w is not None)
        return [(s, w / total) for s, w in zip(specs, weights) if w is not None]


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
    """Linear warm-up steps (None = max(5% of training, min(a quarter of it, 25 steps)))."""
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
    precision: str = "auto"
    """'bf16' (autocast, fp32 master weights), 'fp32', or 'auto': bf16 on GPUs that have it,
    on CPUs whichever of bf16 and fp32 matmuls measures faster (AVX2-only CPUs emulate bf16)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    fused_mlp: str = "off"
    """Dense GELU MLPs through the token-tiled fused kernel (kiln.models.fused_mlp): 'off',
    'auto' (time fused vs unfused on this run's shape; fused only if faster; the choice is kept
    per machine and shape in $KILN_CACHE/hardware.json, so a resumed run computes the same),
    'on'."""
    cpu_attention: str = "auto"
    """Causal bf16 attention on CPU (kiln.models.cpu_attention): 'sdpa' (torch's flash kernel),
    'matmul' (bf16 matmuls around an fp32 softmax) or 'auto' (time both on the run's shape, take
    the faster: which wins depends on the CPU; kept per machine and shape in
    $KILN_CACHE/hardware.json, so every run there, a resumed one included, computes the same)."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    eval_every: int = 100
    """Compute validation loss every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "micro_batch_size",
            "max_steps",
            "flops",
            "tokens_per_param",
            "lr",
            "eval_batches",
            "max_bad_steps",
        ):
            check_positive("train", name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "eps"):
            check_positive("train", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio is {self.min_lr_ratio} but must be in [0, 1].")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} is {getattr(self, name)} but must be in [0, 1).")
        check_choice("train", "decay", self.decay, ["cosine", "linear"])
        check_choice("train", "precision", self.precision, ["auto", "bf16", "fp32"])
        check_choice("train", "fused_mlp", self.fused_mlp, ["off", "auto", "on"])
        check_choice("train", "cpu_attention", self.cpu_attention, ["auto", "sdpa", "matmul"])


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
