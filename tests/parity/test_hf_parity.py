"""Logit parity with transformers' GPT-2 and Llama on random tiny configs (fp32, max |Δ| ≤ 1e-5).

The weight mapping lives here on purpose: kiln.interop owns the real converter.
"""

import pytest
import torch

from kiln.models.gpt import GPT, GPTConfig
from kiln.models.presets import PRESETS

transformers = pytest.importorskip("transformers")


def _load(model: GPT, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected


def gpt2_to_kiln(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 Conv1D weights are [in, out] (transposed) and c_attn fuses [q; k; v]."""
    sd = {
        "tok_emb.weight": hf_sd["transformer.wte.weight"],
        "pos_emb.weight": hf_sd["transformer.wpe.weight"],
        "norm.weight": hf_sd["transformer.ln_f.weight"],
        "norm.bias": hf_sd["transformer.ln_f.bias"],
    }
    d = cfg.d_model
    for i in range(cfg.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            sd[b + ours + ".weight"] = hf_sd[h + theirs + ".weight"]
            sd[b + ours + ".bias"] = hf_sd[h + theirs + ".bias"]
        w, bias = hf_sd[h + "attn.c_attn.weight"].t(), hf_sd[h + "attn.c_attn.bias"]
        for j, name in enumerate(("wq", "wk", "wv")):
            sd[b + f"attn.{name}.weight"] = w[j * d : (j + 1) * d]
            sd[b + f"attn.{name}.bias"] = bias[j * d : (j + 1) * d]
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.w1", "mlp.c_fc"),
                             ("mlp.w2", "mlp.c_proj")):  # fmt: skip
            sd[b + ours + ".weight"] = hf_sd[h + theirs + ".weight"].t()
            sd[b + ours + ".bias"] = hf_sd[h + theirs + ".bias"]
    return {k: v.contiguous() for k, v in sd.items()}


def llama_to_kiln(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    sd = {"tok_emb.weight": hf_sd["model.embed_tokens.weight"],
          "norm.weight": hf_sd["model.norm.weight"]}  # fmt: skip
    if not cfg.tie_embeddings:
        sd["head.weight"] = hf_sd["lm_head.weight"]
    names = {
        "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
        "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
        "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
        "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
    }  # fmt: skip
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            sd[f"blocks.{i}.{ours}.weight"] = hf_sd[f"model.layers.{i}.{theirs}.weight"]
    return sd


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases so a mapping mistake cannot hide behind ones and zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("activation,n_inner", [("gelu_new", None), ("gelu", 96)])
def test_gpt2_parity(activation, n_inner):
    hf_cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=3, n_inner=n_inner,
        activation_function=activation, layer_norm_epsilon=1e-5, attn_pdrop=0.0,
        embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _randomise(hf)
    cfg = GPTConfig(
        n_layers=2, d_model=48, n_heads=3, n_kv_heads=3, d_head=16, d_ffn=n_inner or 4 * 48,
        vocab_size=97, max_seq_len=32, position="learned", norm="layernorm",
        activation="gelu_tanh" if activation == "gelu_new" else "gelu", bias=True,
        tie_embeddings=True,
    )  # fmt: skip
    ours = GPT(cfg).eval()
    _load(ours, gpt2_to_kiln(hf.state_dict(), cfg))
    tokens = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5


LLAMA_CASES = {
    "gqa-untied": dict(n_kv_heads=2, tie=False, scaling=None),
    "mqa-tied": dict(n_kv_heads=1, tie=True, scaling=None),
    "llama3-scaling": dict(
        n_kv_heads=2,
        tie=False,
        scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),  # fmt: skip
    "linear-scaling": dict(n_kv_heads=4, tie=False, scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_parity(case):
    c = LLAMA_CASES[case]
    theta = 500000.0 if c["scaling"] else 10000.0
    kwargs = {}
    if c["scaling"] is not None:
        kwargs["rope_scaling"] = dict(c["scaling"], rope_theta=theta)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=c["n_kv_heads"], head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=theta,
        tie_word_embeddings=c["tie"], attention_bias=False, mlp_bias=False, **kwargs,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    _randomise(hf)
    cfg = GPTConfig(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=c["n_kv_heads"], d_head=16, d_ffn=96,
        vocab_size=101, max_seq_len=64, position="rope", rope_theta=theta,
        rope_scaling=c["scaling"], norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
        bias=False, tie_embeddings=c["tie"],
    )  # fmt: skip
    ours = GPT(cfg).eval()
    _load(ours, llama_to_kiln(hf.state_dict(), cfg))
    tokens = torch.randint(0, 101, (2, 64))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["cerebras-gpt-111m", "cerebras-gpt-256m", "cerebras-gpt-2.7b"])
def test_cerebras_counts_match_transformers(name):
    """Our analytic count equals GPT2LMHeadModel's for the released Hugging Face config."""
    c = PRESETS[name]
    hf_cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
        n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ffn, activation_function="gelu",
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    assert c.num_params() == hf.num_parameters()


def test_smollm2_count_matches_transformers():
    c = PRESETS["smollm2-135m"]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ffn,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    assert c.num_params() == hf.num_parameters()
