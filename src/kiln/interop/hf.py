"""Hugging Face folders ↔ Kiln GPT: GPT-2 family (GPT2LMHeadModel, as Cerebras-GPT ships),
Llama family (LlamaForCausalLM: GQA, rope scaling, tied or untied head) and the MoE families
built on Llama blocks (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE: kiln.interop.hf_moe).

A folder is ``config.json`` + ``model.safetensors`` (or a sharded ``*.safetensors`` index, or
``pytorch_model.bin``) + tokenizer files. Weight names map one-to-one onto kiln.models.gpt's::

    GPT-2: transformer.h.{i}.attn.c_attn  [in, 3d] Conv1D (transposed, fused q;k;v) → wq, wk, wv
    Llama: model.layers.{i}.self_attn.q_proj [out, in]                             → attn.wq
    MoE families: the router, experts, shared expert and q/k norms (kiln.interop.hf_moe)

Reading needs only safetensors/torch; writing builds config.json through transformers' config
classes so the folder matches the installed transformers exactly (transformers is imported
only here and in tests, never at training time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.interop import hf_moe
from kiln.models.gpt import GPTConfig
from kiln.planning.moe import is_moe_layer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Weight dtypes ``kiln convert --dtype`` writes."""
GPT2_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
LLAMA_NAMES = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise KilnError(f"{folder} has no config.json, so it is not a Hugging Face model folder.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KilnError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from e


ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", **hf_moe.FAMILIES}
"""model_type → the architecture class that converts."""


def architecture(hf: dict[str, Any]) -> str:
    """A model_type of ARCHITECTURES, or a KilnError naming what the config declares."""
    archs = hf.get("architectures") or []
    kind = hf.get("model_type", "")
    for model_type, cls in ARCHITECTURES.items():
        if cls in archs or (not archs and kind == model_type):
            return model_type
    found = ", ".join(archs) or kind or "nothing"
    raise KilnError(
        f"config.json declares {found} but only {', '.join(ARCHITECTURES.values())} convert."
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, kiln rope_scaling) from legacy rope_theta/rope_scaling or rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("rope_theta", None)
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise KilnError(f"rope scaling type {kind!r} is not supported (use linear or llama3).")
    return theta, dict(scaling, rope_type=kind)


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """A Kiln shape from a transformers config.json dict."""
    arch = architecture(hf)
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACT:
            raise KilnError(f"GPT-2 activation_function {act!r} has no Kiln equivalent.")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise KilnError("GPT-2 configs with non-standard attention scaling do not convert.")
        d, h = int(hf["n_embd"]), int(hf["n_head"])
        return GPTConfig(
            n_layers=int(hf["n_layer"]), d_model=d, n_heads=h, n_kv_heads=h, d_head=d // h,
            d_ffn=int(hf.get("n_inner") or 4 * d), vocab_size=int(hf["vocab_size"]),
            max_seq_len=int(hf["n_positions"]), position="learned", norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), activation=GPT2_ACT[act],
            bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        ).validate()  # fmt: skip
    if arch in hf_moe.FAMILIES:
        return hf_moe.moe_config_from_hf(arch, hf, _llama_config(hf))
    return _llama_config(hf)


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise KilnError("Llama configs with attention_bias or mlp_bias do not convert.")
    if hf.get("hidden_act", "silu") != "silu":
        raise KilnError(f"Llama hidden_act {hf['hidden_act']!r} is not silu (SwiGLU).")
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    return GPTConfig(
        n_layers=int(hf["num_hidden_layers"]), d_model=d, n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h),
        d_head=int(hf.get("head_dim") or d // h),
        d_ffn=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), position="rope",
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu", bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    ).validate()  # fmt: skip


def export_arch(cfg: GPTConfig) -> str:
    """Which HF architecture can hold this shape, or a KilnError naming the blocker."""
    blockers = []
    if cfg.parallel_block:
        blockers.append("parallel_block")
    if cfg.embedding_multiplier != 1.0 or cfg.output_multiplier != 1.0:
        blockers.append("μP multipliers")
    if cfg.attn_scale is not None:
        blockers.append(f"attn_scale {cfg.attn_scale}")
    gpt2 = (cfg.position, cfg.norm, cfg.bias) == ("learned", "layernorm", True)
    gpt2 = gpt2 and cfg.activation in ("gelu", "gelu_tanh") and cfg.n_kv_heads == cfg.n_heads
    gpt2 = gpt2 and cfg.n_heads * cfg.d_head == cfg.d_model
    llama = (cfg.position, cfg.norm, cfg.activation, cfg.bias) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
    )
    family, why = hf_moe.moe_family(cfg) if cfg.moe is not None and llama else (None, "")
    if why:
        blockers.append(why)
    if cfg.moe is None and (cfg.qk_norm != "none" or cfg.qkv_bias):
        blockers.append(f"qk_norm {cfg.qk_norm} / qkv_bias {cfg.qkv_bias} without experts")
    if not (gpt2 or llama):
        blockers.append(
            f"position={cfg.position}, norm={cfg.norm}, activation={cfg.activation}, "
            f"bias={cfg.bias}, heads {cfg.n_heads}/{cfg.n_kv_heads}×{cfg.d_head}"
        )
    if blockers:
        raise KilnError(
            f"this model cannot be written as {', '.join(ARCHITECTURES.values())} "
            f"({'; '.join(blockers)})."
        )
    return family or ("gpt2" if gpt2 else "llama")


# -- weights ---------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder (safetensors single/sharded, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise KilnError(f"{folder} holds no *.safetensors or pytorch_model.bin weights.")


def _take(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in sd:
        raise KilnError(f"the Hugging Face weights lack {key}, which this config requires.")
    t = sd[key]
    if tuple(t.shape) != shape:
        raise KilnError(f"{key} has shape {list(t.shape)} but the config implies {list(shape)}.")
    return t.float()


def gpt2_to_kiln(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 Conv1D weights are [in, out] (transposed); c_attn fuses [q; k; v] along out."""
    hf_sd = {
        k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v
        for k, v in hf_sd.items()
    }  # fmt: skip  (original GPT-2 files omit the prefix)
    d, f, V = cfg.d_model, cfg.d_ffn, cfg.vocab_size
    sd = {
        "tok_emb.weight": _take(hf_sd, "transformer.wte.weight", (V, d)),
        "pos_emb.weight": _take(hf_sd, "transformer.wpe.weight", (cfg.max_seq_len, d)),
        "norm.weight": _take(hf_sd, "transformer.ln_f.weight", (d,)),
        "norm.bias": _take(hf_sd, "transformer.ln_f.bias", (d,)),
    }
    if not cfg.tie_embeddings:
        sd["head.weight"] = _take(hf_sd, "lm_head.weight", (V, d))
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            sd[b + ours + ".weight"] = _take(hf_sd, h + theirs + ".weight", (d,))
            sd[b + ours + ".bias"] = _take(hf_sd, h + theirs + ".bias", (d,))
        w = _take(hf_sd, h + "attn.c_attn.weight", (d, 3 * d)).t()
        bias = _take(hf_sd, h + "attn.c_attn.bias", (3 * d,))
        for j, name in enumerate(("wq", "wk", "wv")):
            sd[b + f"attn.{name}.weight"] = w[j * d : (j + 1) * d]
            sd[b + f"attn.{name}.bias"] = bias[j * d : (j + 1) * d]
        for ours, theirs, n_in, n_out in (("attn.wo", "attn.c_proj", d, d),
                                          ("mlp.w1", "mlp.c_fc", d, f),
                                          ("mlp.w2", "mlp.c_proj", f, d)):  # fmt: skip
            sd[b + ours + ".weight"] = _take(hf_sd, h + theirs + ".weight", (n_in, n_out)).t()
            sd[b + ours + ".bias"] = _take(hf_sd, h + theirs + ".bias", (n_out,))
    return {k: v.contiguous() for k, v in sd.items()}


def _llama_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.d_ffn
    return {"attn_norm": (d,), "mlp_norm": (d,), "attn.wq": (q, d), "attn.wk": (kv, d),
            "attn.wv": (kv, d), "attn.wo": (d, q), "mlp.w1": (f, d), "mlp.w3": (f, d),
            "mlp.w2": (d, f)}  # fmt: skip


def llama_to_kiln(
    hf_sd: dict[str, torch.Tensor], cfg: GPTConfig, family: str = "llama"
) -> dict[str, torch.Tensor]:
    """Llama blocks; an MoE family's layers through kiln.interop.hf_moe."""
    V, d = cfg.vocab_size, cfg.d_model
    sd = {
        "tok_emb.weight": _take(hf_sd, "model.embed_tokens.weight", (V, d)),
        "norm.weight": _take(hf_sd, "model.norm.weight", (d,)),
    }
    if not cfg.tie_embeddings:
        sd["head.weight"] = _take(hf_sd, "lm_head.weight", (V, d))
    shapes = _llama_shapes(cfg)
    for i in range(cfg.n_layers):
        moe = is_moe_layer(cfg.moe, i)
        for ours, theirs in LLAMA_NAMES.items():
            if not (moe and ours.startswith("mlp.")):
                key = f"model.layers.{i}.{theirs}.weight"
                sd[f"blocks.{i}.{ours}.weight"] = _take(hf_sd, key, shapes[ours])
        for ours, theirs, shape in _attention_extras(cfg):
            sd[f"blocks.{i}.{ours}"] = _take(hf_sd, f"model.layers.{i}.{theirs}", shape)
        if moe:
            sd.update(hf_moe.moe_layer_to_kiln(hf_sd, cfg, i, family, _take))
    return {k: v.contiguous() for k, v in sd.items()}


def _attention_extras(cfg: GPTConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(Kiln name, HF name, shape) of the q/k norms and q/k/v biases a shape has."""
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    out = []
    if cfg.qk_norm != "none":
        head = cfg.qk_norm == "head"
        out += [
            ("attn.q_norm.weight", "self_attn.q_norm.weight", (cfg.d_head if head else q,)),
            ("attn.k_norm.weight", "self_attn.k_norm.weight", (cfg.d_head if head else kv,)),
        ]
    if cfg.qkv_bias:
        out += [
            (f"attn.{ours}.bias", f"self_attn.{p}_proj.bias", (n,))
            for ours, p, n in (("wq", "q", q), ("wk", "k", kv), ("wv", "v", kv))
        ]
    return out  # fmt: skip


def kiln_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse maps; the arch comes from export_arch(cfg)."""
    arch = export_arch(cfg)
    if arch != "gpt2":
        out = {"model.embed_tokens.weight": sd["tok_emb.weight"],
               "model.norm.weight": sd["norm.weight"]}  # fmt: skip
        for i in range(cfg.n_layers):
            moe = is_moe_layer(cfg.moe, i)
            for ours, theirs in LLAMA_NAMES.items():
                if not (moe and ours.startswith("mlp.")):
                    out[f"model.layers.{i}.{theirs}.weight"] = sd[f"blocks.{i}.{ours}.weight"]
            for ours, theirs, _ in _attention_extras(cfg):
                out[f"model.layers.{i}.{theirs}"] = sd[f"blocks.{i}.{ours}"]
            if moe:
                out.update(hf_moe.moe_layer_to_hf(sd, cfg, i, arch))
    else:
        out = {"transformer.wte.weight": sd["tok_emb.weight"],
               "transformer.wpe.weight": sd["pos_emb.weight"],
               "transformer.ln_f.weight": sd["norm.weight"],
               "transformer.ln_f.bias": sd["norm.bias"]}  # fmt: skip
        for i in range(cfg.n_layers):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for p in ("weight", "bias"):
                    out[f"{h}{theirs}.{p}"] = sd[f"{b}{ours}.{p}"]
            qkv = [sd[f"{b}attn.{n}.weight"] for n in ("wq", "wk", "wv")]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
            out[h + "attn.c_attn.bias"] = torch.cat(
                [sd[f"{b}attn.{n}.bias"] for n in ("wq", "wk", "wv")]
            )
            for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.w1", "mlp.c_fc"),
                                 ("mlp.w2", "mlp.c_proj")):  # fmt: skip
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t()
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_state(folder: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(shape, Kiln state dict in fp32) of a Hugging Face folder."""
    hf = read_config(folder)
    cfg = config_from_hf(hf)
    raw = read_weights(folder)
    arch = architecture(hf)
    sd = gpt2_to_kiln(raw, cfg) if arch == "gpt2" else llama_to_kiln(raw, cfg, arch)
    return cfg, sd


# -- writing ---------------------------------------------------------------------------------
def hf_config(cfg: GPTConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json for the shape, built by transformers' own config class."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                  tie_word_embeddings=cfg.tie_embeddings)  # fmt: skip
    arch = export_arch(cfg)
    if arch == "gpt2":
        act = "gelu" if cfg.activation == "gelu" else "gelu_new"
        c = transformers.GPT2Config(
            n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ffn, activation_function=act,
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )  # fmt: skip
    elif arch in hf_moe.FAMILIES:
        c = hf_moe.moe_hf_config(cfg, arch, common)
    else:
        c = transformers.LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_head,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, attention_bias=False,
            mlp_bias=False, hidden_act="silu", **common,
        )  # fmt: skip
    c.architectures = [ARCHITECTURES[arch]]
    out = c.to_dict()
    out["torch_dtype"] = out["dtype"] = dtype
    return out


def end_of_text_id(tokenizer, cfg: GPTConfig) -> int | None:
    """The id written as bos/eos_token_id: the tokenizer's ``<|endoftext|>`` when the model's
    embedding has a row for it, else None (kiln's Tokenizer appends that token past the
    vocabulary of a tokenizer that lacks one, and an id ≥ vocab_size is not a token)."""
    if tokenizer is None or tokenizer.eos_id >= cfg.vocab_size:
        return None
    return tokenizer.eos_id


def write_hf(
    folder: Path, cfg: GPTConfig, sd: dict[str, torch.Tensor], tokenizer, dtype: str = "float32"
) -> None:
    """Write config.json, model.safetensors and (unless ``tokenizer`` is None) tokenizer files
    into an existing empty folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if dtype not in DTYPES:
        raise KilnError(f"--dtype is {dtype!r} but must be one of {', '.join(DTYPES)}.")
    hf_sd = {k: v.to(DTYPES[dtype]) for k, v in kiln_to_hf(sd, cfg).items()}
    eos = end_of_text_id(tokenizer, cfg)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, eos, eos, dtype), indent=2))
    save_file(hf_sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    gen = {} if eos is None else {"bos_token_id": eos, "eos_token_id": eos}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is None:
        return
    tokenizer.save(folder)
    eos_text = None if eos is None else tokenizer.decode([eos])
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_text,
        "eos_token": eos_text,
        "unk_token": None,
        "model_max_length": cfg.max_seq_len,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
