"""Named model shapes as data, and the resolution of a ModelConfig into a GPTConfig.

A new preset is one entry in PRESETS. The Cerebras-GPT entries are the published shapes
(Dey et al. 2023, arXiv:2304.03208): learned positions, layernorm, exact GELU, biases, tied
embeddings, 2048 context, GPT-2 vocabulary (50257), d_ffn = 4 d_model.
"""

from __future__ import annotations

import dataclasses

from kiln.config import ModelConfig, MoEConfig
from kiln.errors import ConfigError, closest
from kiln.models.gpt import GPTConfig


def _cerebras(n_layers: int, d_model: int, n_heads: int, d_head: int) -> GPTConfig:
    return GPTConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head,
        d_ffn=4 * d_model, vocab_size=50257, max_seq_len=2048, position="learned",
        norm="layernorm", norm_eps=1e-5, activation="gelu", bias=True, tie_embeddings=True,
    )  # fmt: skip


PRESETS: dict[str, GPTConfig] = {
    # Learns something real on 2 CPU cores in a few minutes; vocab follows the tokenizer.
    "tiny": GPTConfig(
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=4,
        d_head=64,
        d_ffn=1024,
        vocab_size=4096,
        max_seq_len=256,
        position="learned",
        norm="layernorm",
        activation="gelu",
        bias=True,
        tie_embeddings=True,
    ),  # fmt: skip
    "cerebras-gpt-111m": _cerebras(10, 768, 12, 64),
    "cerebras-gpt-256m": _cerebras(14, 1088, 17, 64),
    "cerebras-gpt-590m": _cerebras(18, 1536, 12, 128),
    "cerebras-gpt-1.3b": _cerebras(24, 2048, 16, 128),
    "cerebras-gpt-2.7b": _cerebras(32, 2560, 32, 80),
    "cerebras-gpt-6.7b": _cerebras(32, 4096, 32, 128),
    "cerebras-gpt-13b": _cerebras(40, 5120, 40, 128),
    # Llama-style counterpart of tiny: RoPE, RMSNorm, SwiGLU, no biases, GQA, untied head.
    "llama-tiny": GPTConfig(
        n_layers=4,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        d_head=64,
        d_ffn=704,
        vocab_size=4096,
        max_seq_len=256,
        position="rope",
        rope_theta=10000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
    ),  # fmt: skip
    # HuggingFaceTB/SmolLM2-135M.
    "smollm2-135m": GPTConfig(
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        d_head=64,
        d_ffn=1536,
        vocab_size=49152,
        max_seq_len=8192,
        position="rope",
        rope_theta=100000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        bias=False,
        tie_embeddings=True,
    ),  # fmt: skip
}
# Mixture-of-experts shapes (kiln.models.moe): same blocks, MoE MLPs.
PRESETS |= {
    # CPU-sized: llama-tiny with 8 experts of half its MLP width, top-2 (active ≈ llama-tiny).
    "tiny-moe": PRESETS["llama-tiny"].replace(
        moe=MoEConfig(experts=8, top_k=2, d_expert=352, normalize_top_k=True)
    ),
    # Switch Transformer style cerebras-gpt-111m: every MLP → 8 experts, top-1, capacity 1.25.
    "switch-cerebras-gpt-111m": PRESETS["cerebras-gpt-111m"].replace(
        moe=MoEConfig(experts=8, top_k=1, capacity_factor=1.25)
    ),
    # mistralai/Mixtral-8x7B-v0.1 (router_aux_loss_coef 0.02).
    "mixtral-8x7b": GPTConfig(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_head=128, d_ffn=14336,
        vocab_size=32000, max_seq_len=32768, position="rope", rope_theta=1e6, norm="rmsnorm",
        norm_eps=1e-5, activation="swiglu", bias=False, tie_embeddings=False,
        moe=MoEConfig(experts=8, top_k=2, normalize_top_k=True, aux_loss_coef=0.02),
    ),
    # allenai/OLMoE-1B-7B-0924 shape, with its q/k RMSNorms over the whole projected width.
    "olmoe-1b-7b": GPTConfig(
        n_layers=16, d_model=2048, n_heads=16, n_kv_heads=16, d_head=128, d_ffn=1024,
        vocab_size=50304, max_seq_len=4096, position="rope", rope_theta=10000.0,
        norm="rmsnorm", norm_eps=1e-5, activation="swiglu", bias=False, tie_embeddings=False,
        qk_norm="full",
        moe=MoEConfig(experts=64, top_k=8, aux_loss_coef=0.01, z_loss_coef=0.001),
    ),
}  # fmt: skip

PUBLISHED_PARAMS: dict[str, float] = {
    "cerebras-gpt-111m": 111.05e6,
    "cerebras-gpt-256m": 255.98e6,
    "cerebras-gpt-590m": 590.31e6,
    "cerebras-gpt-1.3b": 1.3157e9,
    "cerebras-gpt-2.7b": 2.6516e9,
    "cerebras-gpt-6.7b": 6.6584e9,
    "cerebras-gpt-13b": 12.853e9,
    "smollm2-135m": 134.52e6,
}
"""Parameter counts of the released checkpoints (their Hugging Face configs, tied head counted
once). The names round them: "1.3B" holds 1.316e9 and "2.7B" 2.652e9 (as GPT-3's do)."""


def resolve_model(
    model_cfg: ModelConfig, vocab_size: int | None = None, moe_cfg: MoEConfig | None = None
) -> tuple[GPTConfig, list[str]]:
    """Preset + explicit overrides + the tokenizer's vocabulary → a validated GPTConfig.

    Overriding d_model or n_heads re-derives d_head = d_model / n_heads unless d_head is given;
    overriding n_heads without n_kv_heads means plain multi-head attention. The ``moe``
    section's non-default fields override the preset's MoE shape (or make a dense preset MoE
    when they set experts). Returns notes (one sentence each) about values that differ from
    the preset's for a reason.
    """
    if model_cfg.preset not in PRESETS:
        raise ConfigError(
            f"model.preset is {model_cfg.preset!r} but must be one of {', '.join(PRESETS)}"
            f"{closest(model_cfg.preset, PRESETS)}."
        )
    base = PRESETS[model_cfg.preset]
    changes = model_cfg.overrides()
    if ("d_model" in changes or "n_heads" in changes) and "d_head" not in changes:
        d_model = changes.get("d_model", base.d_model)
        n_heads = changes.get("n_heads", base.n_heads)
        if d_model % n_heads != 0:
            raise ConfigError(
                f"model.n_heads {n_heads} does not divide model.d_model {d_model}; choose a "
                f"divisor of {d_model} or set model.d_head explicitly."
            )
        changes["d_head"] = d_model // n_heads
    if "n_heads" in changes and "n_kv_heads" not in changes:
        changes["n_kv_heads"] = changes["n_heads"]
    notes = []
    if vocab_size is not None and vocab_size != base.vocab_size:
        notes.append(
            f"vocab_size {vocab_size} follows the tokenizer "
            f"(preset {model_cfg.preset} publishes {base.vocab_size})"
        )
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    moe_changes = moe_cfg.overrides() if moe_cfg is not None else {}
    if moe_changes:
        changes["moe"] = dataclasses.replace(base.moe or MoEConfig(), **moe_changes)
    cfg = dataclasses.replace(base, **changes)
    if cfg.moe is not None and not cfg.moe.enabled:
        cfg = dataclasses.replace(cfg, moe=None)
    return cfg.validate(), notes
