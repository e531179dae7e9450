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
    qkv_bias: bool | None = None
    """Biases on the q, k and v projections even when ``bias`` is off (Qwen2)."""
    qk_norm: str | None = None
    """Normalise queries and keys after their projections: 'none', 'head' (each head, Qwen3)
    or 'full' (the whole projected q and k widths, OLMoE)."""
    parametrization: str = "sp"
    """'sp' (standard, GPT-2 init) or 'mup' (maximal update parametrization, Cerebras-GPT rules)."""
    mup_base_width: int = 256
    """μP base width: the width at which μP and standard parametrization coincide."""

    def __post_init__(self) -> None:
        for name in (
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "d_head",
            "d_ffn",
            "max_seq_len",
            "mup_base_width",
        ):
            check_positive("model", name, getattr(self, name))
        check_positive("model", "rope_theta", self.rope_theta)
        if self.position is not None:
            check_choice("model", "position", self.position, ["learned", "rope"])
        if self.norm is not None:
            check_choice("model", "norm", self.norm, ["layernorm", "rmsnorm"])
        if self.activation is not None:
            check_choice("model", "activation", self.activation, ["gelu", "gelu_tanh", "swiglu"])
        if self.qk_norm is not None:
            check_choice("model", "qk_norm", self.qk_norm, ["none", "head", "full"])
        check_choice("model", "parametrization", self.parametrization, ["sp", "mup"])

    def overrides(self) -> dict[str, Any]:
        """The architecture fields set explicitly (not None), to apply on top of the preset."""
        skip = {"preset", "parametrization", "mup_base_width"}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }


MOE_ROUTERS = ["softmax", "sigmoid"]


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs (kiln.models.moe); off while ``experts`` is 0.

    A preset may carry its own MoE shape; fields given here that differ from these defaults
    override the preset's (``kiln.models.presets.resolve_model``).
    """

    experts: int = 0
    """Routed experts per MoE layer (0 = dense model)."""
    top_k: int = 2
    """Experts each token is sent to (1 = Switch Transformer, 2 = Mixtral)."""
    router: str = "softmax"
    """Token-choice router scores: 'softmax' (Switch, Mixtral) or 'sigmoid' (DeepSeek-V3)."""
    normalize_top_k: bool = False
    """Rescale the k chosen scores to sum to 1 (Mixtral, DeepSeek-V3); never with top_k 1."""
    shared_experts: int = 0
    """Always-active shared experts (DeepSeek-MoE), run as one dense MLP of their total width."""
    shared_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(x·w), w a learned [1, d] row
    (Qwen2-MoE's shared_expert_gate); needs shared_experts > 0."""
    d_expert: int | None = None
    """Hidden width of one expert (None = model.d_ffn)."""
    every: int = 1
    """Layer i is MoE when i >= first_dense and i % every == 0 (DeepSeek's convention)."""
    first_dense: int = 0
    """The first this many layers keep a dense MLP."""
    capacity_factor: float | None = None
    """None = dropless; else each expert takes at most ceil(factor · tokens · top_k / experts)
    token slots per micro-batch and the rest are dropped (Switch), first choices first."""
    aux_loss_coef: float = 0.01
    """Switch load-balancing loss coefficient α (0 = off)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (ST-MoE uses 1e-3; 0 = off)."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): per-expert routing bias step γ (0 = off)."""
    kernel: str = "auto"
    """Expert matmuls: 'auto' (the fastest of the others, timed at first use per shape),
    'grouped' (torch._grouped_mm), 'padded' (one bmm over rows zero-padded per expert) or
    'loop'."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> MoEConfig:
        """Raise ConfigError (one sentence) for a shape that cannot be routed; return self."""
        for name in ("experts", "shared_experts", "first_dense"):
            check_positive("moe", name, getattr(self, name), allow_zero=True)
        for name in ("top_k", "d_expert", "every"):
            check_positive("moe", name, getattr(self, name))
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_positive("moe", name, getattr(self, name), allow_zero=True)
        check_choice("moe", "router", self.router, MOE_ROUTERS)
        check_choice("moe", "kernel", self.kernel, ["auto", "grouped", "padded", "loop"])
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"moe.capacity_factor is {self.capacity_factor} but must be > 0 "
                "(e.g. 1.25), or unset for dropless routing."
            )
        if self.experts and self.top_k > self.experts:
            raise ConfigError(
                f"moe.top_k is {self.top_k} but must not exceed moe.experts {self.experts}."
            )
        if self.shared_gate and not self.shared_experts:
            raise ConfigError(
                "moe.shared_gate gates the shared experts but moe.shared_experts is 0; set "
                "--moe.shared_experts 1 or more, or --moe.shared_gate false."
            )
        if self.experts and self.top_k == 1 and self.normalize_top_k:
            raise ConfigError(
                "moe.normalize_top_k with top_k 1 makes every gate 1 and leaves the router "
                "untrained by the language-model loss; set --moe.normalize_top_k false."
            )
        return self

    @property
    def enabled(self) -> bool:
        """True when the model has routed experts."""
        return self.experts > 0

    def overrides(self) -> dict[str, Any]:
        """The fields that differ from the defaults (applied on top of a preset's MoE)."""
        default = MoEConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


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
    'auto' (time fused vs unfused on this run's shape at start; fused only if faster), 'on'."""
    cpu_attention: str = "auto"
    """Causal bf16 attention on CPU (kiln.models.cpu_attention): 'sdpa' (torch's flash kernel),
    'matmul' (bf16 matmuls around an fp32 softmax) or 'auto' (time both at start, take the
    faster: which wins depends on the CPU)."""
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


SPARSE_DEFAULT_INCLUDE = ["blocks.*.attn.w*.weight", "blocks.*.mlp.w*.weight"]


@dataclass
class SparsityConfig:
    """Sparse training (kiln.sparsity): which matrices, how sparse, which pattern and algorithm.

    Off by default (level 0 and no per_param): nothing changes for dense runs.
    """

    level: float = 0.0
    """Overall target sparsity of the selected matrices (0 = off; e.g. 0.875 keeps 1 in 8)."""
    per_param: dict[str, float] = field(default_factory=dict)
    """Glob over parameter names → sparsity level for those parameters (overrides level)."""
    pattern: str = "block"
    """'unstructured', 'N:M' (e.g. '2:4', N kept in every M inputs) or 'block' (b×b blocks)."""
    block_size: int = 32
    """Block edge for pattern 'block' (kernel: multiple of 32). 64 is faster per matrix but
    must divide every matrix and, balanced, hold the level per line: 87.5% needs d % 512 == 0
    (tiny's 256 and 111m's 768 attention fail), so the default stays 32."""
    balanced: bool = True
    """Block pattern: every block-row (or block-column) keeps the same number of blocks."""
    distribution: str = "uniform"
    """How level is spread over matrices: 'uniform' or 'erk' (density ∝ (in+out)/(in·out))."""
    include: list[str] = field(default_factory=lambda: list(SPARSE_DEFAULT_INCLUDE))
    """Globs of parameter names made sparse by level (embeddings, norms, biases, head: dense)."""
    algorithm: str = "static"
    """'static' (fixed mask), 'gmp' (gradual magnitude pruning), 'set', 'rigl' or 'spdf'."""
    init: str = "random"
    """How a static/SET/RigL/SPDF mask is first chosen: 'random' or 'magnitude'."""
    mask_step: int = 0
    """Train dense until this many steps are done, then compute the masks (0 = at init)."""
    start_step: int = 0
    """GMP: the step at which pruning starts (from dense)."""
    end_step: int | None = None
    """GMP: the step at which the final level is reached (None = 75% of train.max_steps)."""
    update_every: int = 100
    """GMP pruning interval and SET/RigL mask-update interval ΔT, in steps."""
    update_fraction: float = 0.3
    """SET/RigL: fraction α of kept weights dropped and regrown at step 0 (cosine-decayed)."""
    stop_step: int | None = None
    """SET/RigL: last step with mask updates, T_end (None = 75% of train.max_steps)."""
    dense_step: int | None = None
    """SPDF: sparse until this step, dense fine-tuning after (None = 75% of train.max_steps)."""
    kernel: str = "auto"
    """Forward kernel: 'auto' (fastest measured per shape: dense, masked or a sparse kernel),
    'dense' (plain matmul on the zero-filled weight), 'masked' (dense × mask) or 'block'."""

    def __post_init__(self) -> None:
        _check_level("sparsity.level", self.level)
        for glob, value in self.per_param.items():
            _check_level(f"sparsity.per_param[{glob!r}]", value)
        nm = _parse_nm(self.pattern)
        if nm is None:
            check_choice("sparsity", "pattern", self.pattern, ["unstructured", "block", "N:M"])
        check_positive("sparsity", "block_size", self.block_size)
        check_choice("sparsity", "distribution", self.distribution, ["uniform", "erk"])
        check_choice(
            "sparsity", "algorithm", self.algorithm, ["static", "gmp", "set", "rigl", "spdf"]
        )
        check_choice("sparsity", "init", self.init, ["random", "magnitude"])
        check_choice("sparsity", "kernel", self.kernel, ["auto", "dense", "masked", "block"])
        for name in ("mask_step", "start_step", "end_step", "stop_step", "dense_step"):
            check_positive("sparsity", name, getattr(self, name), allow_zero=True)
        check_positive("sparsity", "update_every", self.update_every)
        if not 0.0 < self.update_fraction <= 1.0:
            raise ConfigError(
                f"sparsity.update_fraction is {self.update_fraction} but must be in (0, 1]."
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ConfigError(
                f"sparsity.end_step is {self.end_step} but must be after start_step "
                f"{self.start_step}."
            )
        if nm is not None:
            self._check_nm(*nm)
        if self.kernel == "block" and (self.pattern != "block" or self.block_size % 32):
            raise ConfigError(
                f"sparsity.kernel 'block' needs pattern 'block' with a block_size that is a "
                f"multiple of 32, got pattern {self.pattern!r} and block_size {self.block_size}."
            )

    def _check_nm(self, n: int, m: int) -> None:
        implied = 1.0 - n / m
        named = [(f"per_param[{g!r}]", v) for g, v in self.per_param.items()]
        for where, value in [("level", self.level), *named]:
            if value and abs(value - implied) > 1e-9:
                raise ConfigError(
                    f"sparsity.{where} is {value} but pattern {n}:{m} fixes the level at "
                    f"{implied:g}; set it to {implied:g} or choose another pattern."
                )
        if self.algorithm == "gmp":
            raise ConfigError(
                f"sparsity.algorithm 'gmp' changes the level, which pattern {n}:{m} fixes; "
                "use 'unstructured' or 'block' with gmp."
            )

    @property
    def enabled(self) -> bool:
        """True when any parameter is made sparse."""
        return self.level > 0 or any(v > 0 for v in self.per_param.values())


def _check_level(where: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} is {value} but must be in [0, 1) (e.g. 0.875 keeps 1 in 8).")


def _parse_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) for an 'N:M' pattern string, None for any other; N > M is an error."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ConfigError(f"sparsity.pattern is {pattern!r} but N:M needs 0 < N <= M (e.g. '2:4').")
    return n, m


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
