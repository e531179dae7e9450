"""kiln convert: HF → Kiln → HF round trips and GGUF import; logits equal transformers' (fp32)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.data.corpus import Document
from kiln.data.tokenizer import train_bpe
from kiln.errors import KilnError
from kiln.interop.load import convert, load_any

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog while 12 cats sleep in the sun. " * 40


@pytest.fixture(scope="module")
def tok():
    return train_bpe([Document("a", TEXT)], 300)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial norms so a mapping mistake cannot hide behind ones and zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _llama(tok, tied: bool, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(tok, act="gelu"):
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=3,
        activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _round_trip(hf_model, tok, tmp: Path) -> None:
    _randomise(hf_model)
    hf_model.save_pretrained(tmp / "hf")
    tok.save(tmp / "hf")
    convert(tmp / "hf", tmp / "kiln")
    loaded = load_any(tmp / "kiln")
    x = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(x).logits
        assert (loaded.model(x) - ref).abs().max() < 1e-4
    convert(tmp / "kiln", tmp / "hf2")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf2").eval()
    with torch.no_grad():
        assert (again(x).logits - ref).abs().max() < 1e-4
    fast = transformers.AutoTokenizer.from_pretrained(tmp / "hf2")
    assert fast("the lazy dog")["input_ids"] == tok.encode("the lazy dog")
    # this tokenizer has <|endoftext|> inside the vocabulary: the export names it
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((tmp / "hf2" / name).read_text())
        assert ids["bos_token_id"] == ids["eos_token_id"] == tok.eos_id < tok.vocab_size


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_gpt2_round_trip(tok, tmp_path, act):
    _round_trip(_gpt2(tok, act), tok, tmp_path)


def test_llama_gqa_untied_rope_scaling_round_trip(tok, tmp_path):
    scaling = {"rope_type": "linear", "factor": 2.0}
    _round_trip(_llama(tok, tied=False, rope_scaling=scaling), tok, tmp_path)


def test_llama_tied_round_trip(tok, tmp_path):
    _round_trip(_llama(tok, tied=True), tok, tmp_path)


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation, written out independently here."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_model, tok, path: Path, dtype=np.float32) -> None:
    """``dtype``: a numpy float type, or a gguf quantisation name (e.g. "Q4_1"), for the
    matrices. Quantised, the HF model's matrices are replaced by their dequantised values, so
    it stays the exact reference for the file (quantisation blocks run along each row, which
    the q/k row permutation does not split)."""
    import gguf

    def tensor(name, t, param):
        if t.ndim == 1:
            return w.add_tensor(name, t)
        if not isinstance(dtype, str):
            return w.add_tensor(name, t.astype(dtype))
        qtype = gguf.GGMLQuantizationType[dtype]
        with torch.no_grad():
            ref = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
            param.copy_(torch.from_numpy(ref.copy()))
        w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    model = json.loads(tok.to_json())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    params = {k: p.detach() for k, p in hf_model.named_parameters()}
    sd = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    tensor(
        "token_embd.weight", sd["model.embed_tokens.weight"], params["model.embed_tokens.weight"]
    )
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        tensor("output.weight", sd["lm_head.weight"], params["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            key = f"model.layers.{i}.{theirs}.weight"
            t = sd[key]
            if ours == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            tensor(f"blk.{i}.{ours}.weight", t, params[key])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float16, 2e-2), ("Q4_1", 1e-4)])
def test_gguf_import(tok, tmp_path, dtype, tol):
    hf_model = _llama(tok, tied=False)
    _randomise(hf_model)
    _write_gguf(hf_model, tok, tmp_path / "m.gguf", dtype)
    convert(tmp_path / "m.gguf", tmp_path / "kiln")
    loaded = load_any(tmp_path / "kiln")
    text = "the lazy dog sleeps 12 times"
    assert loaded.tokenizer.encode(text) == tok.encode(text)
    x = torch.tensor([tok.encode(TEXT[:200])[:32]])
    with torch.no_grad():
        assert (loaded.model(x) - hf_model(x).logits).abs().max() < tol


def test_refuses_non_empty_destination_and_unknown_architecture(tok, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    model = _gpt2(tok)
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    with pytest.raises(KilnError, match="not empty"):
        convert(tmp_path / "hf", tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    cfg = (tmp_path / "hf" / "config.json").read_text().replace("GPT2LMHeadModel", "BertModel")
    (tmp_path / "hf" / "config.json").write_text(cfg)
    with pytest.raises(KilnError, match="BertModel"):
        convert(tmp_path / "hf", tmp_path / "new")


def _mixtral(tok):
    cfg = transformers.MixtralConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0, sliding_window=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_mixtral_round_trip(tok, tmp_path):
    """HF Mixtral → Kiln MoE → HF: fp32 logits within 1e-4 both ways; routing included."""
    _round_trip(_mixtral(tok), tok, tmp_path)
    loaded = load_any(tmp_path / "kiln")
    moe = loaded.shape.moe
    assert (moe.experts, moe.top_k, moe.normalize_top_k) == (4, 2, True)
    assert loaded.shape.rope_theta == 10000.0


def test_kiln_moe_with_its_own_expert_width_exports_as_mixtral(tok, tmp_path):
    from kiln.config import MoEConfig
    from kiln.interop.load import save_hf
    from kiln.models.gpt import GPT, GPTConfig
    from kiln.train.load import LoadedModel

    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_ffn=999,
                    vocab_size=tok.vocab_size, max_seq_len=32, position="rope", norm="rmsnorm",
                    activation="swiglu", bias=False, tie_embeddings=False,
                    moe=MoEConfig(experts=4, top_k=2, d_expert=24, normalize_top_k=True),
                    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    save_hf(LoadedModel(model, tok, cfg, None, {}), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4


def test_mixtral_export_refuses_a_router_kiln_cannot_express(tok, tmp_path):
    from kiln.config import MoEConfig
    from kiln.interop.hf import export_arch

    hf = _mixtral(tok)
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    shape = load_any(tmp_path / "hf").shape
    with pytest.raises(KilnError, match="moe.router sigmoid"):
        export_arch(shape.replace(moe=MoEConfig(experts=4, top_k=2, router="sigmoid")))


MOE_SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                 tie_word_embeddings=False)  # fmt: skip


def _moe_model(tok, family: str, **kw):
    """A small random model of a transformers MoE family."""
    config, model = {
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[family]
    cfg = config(vocab_size=tok.vocab_size, **(MOE_SIZES | kw))
    torch.manual_seed(0)
    return model(cfg).eval()


def test_olmoe_round_trip(tok, tmp_path):
    """OLMoE: q/k RMSNorm over the whole projected widths, top-k not renormalised."""
    _round_trip(_moe_model(tok, "olmoe", num_hidden_layers=2, intermediate_size=32), tok,
                tmp_path)  # fmt: skip
    shape = load_any(tmp_path / "kiln").shape
    assert shape.qk_norm == "full" and not shape.moe.normalize_top_k
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == "olmoe"


def test_qwen3_moe_round_trip_with_a_dense_layer_and_wide_heads(tok, tmp_path):
    """Qwen3-MoE: per-head q/k RMSNorm, head_dim 24 ≠ 64 / 4, norm_topk_prob, layer 0 dense
    (mlp_only_layers, width intermediate_size) and experts of width moe_intermediate_size."""
    hf = _moe_model(tok, "qwen3_moe", num_hidden_layers=3, head_dim=24, intermediate_size=80,
                    moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0])  # fmt: skip
    _round_trip(hf, tok, tmp_path)
    shape = load_any(tmp_path / "kiln").shape
    assert (shape.qk_norm, shape.d_head, shape.d_ffn) == ("head", 24, 80)
    assert (shape.moe.first_dense, shape.moe.d_expert, shape.moe.normalize_top_k) == (1, 32, True)


def test_qwen2_moe_round_trip_with_gated_shared_expert_and_qkv_bias(tok, tmp_path):
    """Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert twice an expert's width."""
    hf = _moe_model(tok, "qwen2_moe", num_hidden_layers=2, intermediate_size=80,
                    moe_intermediate_size=32, shared_expert_intermediate_size=64)  # fmt: skip
    _round_trip(hf, tok, tmp_path)
    shape = load_any(tmp_path / "kiln").shape
    assert shape.qkv_bias and (shape.moe.shared_experts, shape.moe.shared_gate) == (2, True)
    # transformers >= 5 holds the experts fused in memory ([E, 2f, d] gate_up_proj): read too
    from kiln.interop.hf import llama_to_kiln, load_hf_state

    fused = llama_to_kiln(hf.state_dict(), shape, "qwen2_moe")
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    published = load_hf_state(tmp_path / "hf")[1]
    assert fused.keys() == published.keys()
    assert all(torch.equal(fused[k], published[k]) for k in fused)


@pytest.mark.parametrize(
    ("family", "fields", "words"),
    [
        ("qwen2_moe", dict(shared_expert_intermediate_size=48), "not a multiple"),
        ("qwen3_moe", dict(decoder_sparse_step=2), r"experts in layers \[1, 3\]"),
        ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ],
)
def test_moe_families_refuse_what_kiln_cannot_express(tok, tmp_path, family, fields, words):
    sizes = dict(num_hidden_layers=4, intermediate_size=32)
    if family != "olmoe":
        sizes["moe_intermediate_size"] = 32
    _moe_model(tok, family, **sizes, **fields).save_pretrained(tmp_path / "hf")
    with pytest.raises(KilnError, match=words):
        convert(tmp_path / "hf", tmp_path / "kiln", tokenizer=None)


def test_moe_export_refuses_ungated_shared_experts():
    from kiln.config import MoEConfig
    from kiln.interop.hf import export_arch
    from kiln.models.gpt import GPTConfig

    shape = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_ffn=64,
                      vocab_size=50, max_seq_len=16, position="rope", norm="rmsnorm",
                      activation="swiglu", bias=False,
                      moe=MoEConfig(experts=4, top_k=2, shared_experts=1))  # fmt: skip
    with pytest.raises(KilnError, match="shared experts without moe.shared_gate"):
        export_arch(shape)
    assert export_arch(shape.replace(moe=MoEConfig(experts=4, top_k=2, shared_experts=1,
                                                   shared_gate=True))) == "qwen2_moe"  # fmt: skip
