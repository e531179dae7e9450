"""transformers' mixture-of-experts families ↔ Kiln MoE shapes and weights (kiln.interop.hf
holds the folder layout, the dense families and the Llama parts these share).

All four are Llama blocks (RMSNorm, RoPE, SwiGLU) whose MLPs are, in some layers, a softmax
router choosing the top k of E SwiGLU experts; they differ in what surrounds that::

    family     Kiln shape                      HF config
    Mixtral    normalize_top_k, every layer    num_local_experts
    OLMoE      qk_norm 'full'                  q_norm [n_heads·d_head], k_norm [n_kv·d_head]
    Qwen2-MoE  qkv_bias, shared_experts s,     qkv_bias, shared_expert_intermediate_size =
               shared_gate                     s·moe_intermediate_size, shared_expert_gate [1, d]
    Qwen3-MoE  qk_norm 'head'                  q_norm, k_norm [d_head], head_dim

OLMoE/Qwen renormalise the top-k scores when ``norm_topk_prob`` (Kiln: ``normalize_top_k``).
The Qwen families place experts in layer i when i ∉ mlp_only_layers and (i+1) %
decoder_sparse_step == 0 (dense layers have width intermediate_size, experts
moe_intermediate_size); Kiln's ``every``/``first_dense`` must describe the same layers on import,
and every Kiln placement is written as mlp_only_layers.

Weights as published (what is written; transformers ≥ 5 fuses the experts in memory as
``mlp.experts.gate_up_proj`` [E, 2f, d] = [w1; w3] and ``mlp.experts.down_proj`` [E, d, f], and
both layouts are read)::

    model.layers.{i}.mlp.gate.weight                           → blocks.{i}.mlp.router.weight
    model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight → mlp.experts.w1/w3/w2[j]
    (Mixtral: block_sparse_moe.gate, block_sparse_moe.experts.{j}.w1/w3/w2)
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj     → mlp.shared.w1/w3/w2
    model.layers.{i}.mlp.shared_expert_gate.weight             → mlp.shared_gate.weight
    model.layers.{i}.self_attn.{q,k}_norm.weight               → attn.{q,k}_norm.weight
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.config import MoEConfig
from kiln.errors import KilnError
from kiln.planning.moe import expert_width, is_moe_layer

FAMILIES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
NAMES = {"mixtral": "Mixtral", "olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}
QK_NORM = {"olmoe": "full", "qwen3_moe": "head"}


# -- config.json → shape ---------------------------------------------------------------------
def moe_config_from_hf(family: str, hf: dict[str, Any], llama):
    """The Kiln shape of an MoE family's config.json; ``llama`` is the shape of its Llama
    parts (kiln.interop.hf._llama_config, which refuses biases and other activations)."""
    name = NAMES[family]
    if hf.get("clip_qkv") is not None:
        raise KilnError(f"{name} clip_qkv {hf['clip_qkv']} is not supported; set it to null.")
    if hf.get("sliding_window") and (family == "mixtral" or hf.get("use_sliding_window")):
        raise KilnError(
            f"{name} sliding_window {hf['sliding_window']} is not supported (full causal "
            "attention only); set it to null."
        )
    if (
        family == "olmoe"
        and "head_dim" in hf
        and hf["head_dim"] * hf["num_attention_heads"] != (hf["hidden_size"])
    ):
        raise KilnError("OLMoE with head_dim · num_attention_heads ≠ hidden_size does not convert.")
    experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
    top_k = int(hf["num_experts_per_tok"])
    normalize = family == "mixtral" or bool(hf.get("norm_topk_prob", False))
    if normalize and top_k == 1:
        raise KilnError(
            f"{name} with norm_topk_prob and num_experts_per_tok 1 gives every token a gate of "
            "1, which Kiln does not build; set norm_topk_prob to false."
        )
    moe = dict(experts=experts, top_k=top_k, router="softmax", normalize_top_k=normalize,
               aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))  # fmt: skip
    changes: dict[str, Any] = {"qk_norm": QK_NORM.get(family, "none")}
    if family.startswith("qwen"):
        moe["d_expert"] = int(hf["moe_intermediate_size"])
        moe.update(_placement(hf))
    if family == "qwen2_moe":
        changes["qkv_bias"] = bool(hf.get("qkv_bias", True))
        moe.update(_shared(hf, moe["d_expert"]))
    return llama.replace(moe=MoEConfig(**moe), **changes).validate()


def _placement(hf: dict[str, Any]) -> dict[str, int]:
    """Kiln's every/first_dense for the layers a Qwen config makes MoE, or a KilnError."""
    n, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    want = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    for every in range(1, n + 1):
        for first in range(n + 1):
            m = MoEConfig(experts=1, top_k=1, every=every, first_dense=first)
            if [is_moe_layer(m, i) for i in range(n)] == want:
                return {"every": every, "first_dense": first}
    layers = [i for i in range(n) if want[i]]
    raise KilnError(
        f"experts in layers {layers} (decoder_sparse_step {step}, mlp_only_layers "
        f"{sorted(dense)}) cannot be expressed by Kiln's moe.every and moe.first_dense."
    )


def _shared(hf: dict[str, Any], width: int) -> dict[str, Any]:
    """Qwen2-MoE's gated shared expert as Kiln's shared_experts · d_expert + shared_gate."""
    s = int(hf.get("shared_expert_intermediate_size") or 0)
    if s % width:
        raise KilnError(
            f"Qwen2-MoE shared_expert_intermediate_size {s} is not a multiple of "
            f"moe_intermediate_size {width}, which Kiln's moe.shared_experts cannot express."
        )
    return {"shared_experts": s // width, "shared_gate": s > 0}


# -- shape → family --------------------------------------------------------------------------
def moe_family(cfg) -> tuple[str | None, str]:
    """(family, '') for a Llama-style MoE shape a transformers family holds exactly, else
    (None, why not)."""
    m = cfg.moe
    every_layer = m.every == 1 and m.first_dense == 0
    if m.router != "softmax":
        return None, f"moe.router {m.router} (every family routes with softmax)"
    if m.shared_experts and not m.shared_gate:
        return None, "shared experts without moe.shared_gate (Qwen2-MoE gates them)"
    if m.shared_gate:
        family = "qwen2_moe"
    elif cfg.qk_norm == "full":
        family = "olmoe"
    elif cfg.qk_norm == "head":
        family = "qwen3_moe"
    elif m.normalize_top_k and every_layer:
        family = "mixtral"
    else:
        return None, (
            "MoE without normalize_top_k, dense layers or q/k norms (Mixtral renormalises, "
            "OLMoE and Qwen3-MoE have q/k norms, Qwen2-MoE a gated shared expert)"
        )
    if QK_NORM.get(family, "none") != cfg.qk_norm:
        return None, f"qk_norm {cfg.qk_norm} with {NAMES[family]}'s other features"
    if cfg.qkv_bias and family != "qwen2_moe":
        return None, f"qkv_bias in {NAMES[family]}"
    if family == "olmoe" and not every_layer:
        return None, "dense layers in OLMoE (moe.every 1 and moe.first_dense 0 only)"
    if family == "olmoe" and cfg.n_heads * cfg.d_head != cfg.d_model:
        return None, "OLMoE with n_heads · d_head ≠ d_model"
    return family, ""


def moe_hf_config(cfg, family: str, common: dict[str, Any]):
    """The transformers config object of ``family`` for the shape."""
    import transformers

    m, width = cfg.moe, expert_width(cfg)
    base = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, hidden_act="silu",
                num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef,
                **common)  # fmt: skip
    if family == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=width, head_dim=cfg.d_head, sliding_window=None,
            num_local_experts=m.experts, **base,
        )  # fmt: skip
    base.update(num_experts=m.experts, norm_topk_prob=m.normalize_top_k, pad_token_id=None)
    if family == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=width, attention_bias=False, **base)
    dense = [i for i in range(cfg.n_layers) if not is_moe_layer(m, i)]
    base.update(intermediate_size=cfg.d_ffn, moe_intermediate_size=width, head_dim=cfg.d_head,
                decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False)  # fmt: skip
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(attention_bias=False, **base)
    return transformers.Qwen2MoeConfig(
        qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=m.shared_experts * width, **base
    )


# -- weights ---------------------------------------------------------------------------------
def _experts_at(family: str, i: int) -> tuple[str, dict[str, str]]:
    """The published prefix of layer i's MoE and its names for w1, w3, w2."""
    if family == "mixtral":
        return f"model.layers.{i}.block_sparse_moe.", {"w1": "w1", "w3": "w3", "w2": "w2"}
    return f"model.layers.{i}.mlp.", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def moe_layer_to_kiln(hf_sd, cfg, i: int, family: str, take) -> dict[str, torch.Tensor]:
    """Layer i's router, experts (and gated shared expert) in Kiln's names; ``take`` reads a
    tensor of a given shape or names what is missing (kiln.interop.hf._take)."""
    E, d, f = cfg.moe.experts, cfg.d_model, expert_width(cfg)
    b, fused = f"blocks.{i}.mlp.", f"model.layers.{i}.mlp."
    h, names = _experts_at(family, i)
    if fused + "experts.gate_up_proj" in hf_sd:  # transformers >= 5 in-memory layout
        gate_up = take(hf_sd, fused + "experts.gate_up_proj", (E, 2 * f, d))
        w = {"w1": gate_up[:, :f], "w3": gate_up[:, f:]}
        w["w2"] = take(hf_sd, fused + "experts.down_proj", (E, d, f))
        h = fused
    else:
        shapes = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
        w = {
            ours: torch.stack([take(hf_sd, f"{h}experts.{j}.{names[ours]}.weight", shape)
                               for j in range(E)])
            for ours, shape in shapes.items()
        }  # fmt: skip
    out = {b + "router.weight": take(hf_sd, h + "gate.weight", (E, d)),
           b + "router.expert_bias": torch.zeros(E)}  # fmt: skip
    out.update({b + "experts." + name: t for name, t in w.items()})
    if cfg.moe.shared_gate:
        s = cfg.moe.shared_experts * f
        shapes = {"w1": (s, d), "w3": (s, d), "w2": (d, s)}
        for ours, shape in shapes.items():
            key = f"{fused}shared_expert.{names[ours]}.weight"
            out[f"{b}shared.{ours}.weight"] = take(hf_sd, key, shape)
        out[b + "shared_gate.weight"] = take(hf_sd, fused + "shared_expert_gate.weight", (1, d))
    return out


def moe_layer_to_hf(sd, cfg, i: int, family: str) -> dict[str, torch.Tensor]:
    """The inverse of moe_layer_to_kiln, in the published (unfused) layout."""
    b, (h, names) = f"blocks.{i}.mlp.", _experts_at(family, i)
    bias = sd.get(b + "router.expert_bias")
    if bias is not None and bool(bias.ne(0).any()):
        raise KilnError(
            f"layer {i}'s router has a non-zero expert bias (moe.bias_update_rate), which "
            f"{NAMES[family]}'s router cannot hold; export a model trained without it."
        )
    out = {h + "gate.weight": sd[b + "router.weight"]}
    for ours, theirs in names.items():
        for j, t in enumerate(sd[b + "experts." + ours]):
            out[f"{h}experts.{j}.{theirs}.weight"] = t
    if cfg.moe.shared_gate:
        for ours, theirs in names.items():
            out[f"{h}shared_expert.{theirs}.weight"] = sd[f"{b}shared.{ours}.weight"]
        out[h + "shared_expert_gate.weight"] = sd[b + "shared_gate.weight"]
    return out
