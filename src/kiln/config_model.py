"""The model's config sections: ``model`` (the shape, or a preset and its overrides) and
``moe`` (experts, routing and their kernels). Re-exported by kiln.config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kiln.errors import ConfigError, check_choice, check_positive


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
