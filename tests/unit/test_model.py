"""The plain GPT: meta build + init, KV-cache equivalence, GQA/MQA, blocks, stages, sampling."""

import math

import pytest
import torch

from kiln.models.generate import generate
from kiln.models.gpt import GPT, GPTConfig, KVCache, cross_entropy


def small(**changes) -> GPTConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_ffn=128,
                vocab_size=101, max_seq_len=48)  # fmt: skip
    return GPTConfig(**(base | changes))


LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False,
             tie_embeddings=False, n_kv_heads=2)  # fmt: skip
VARIANTS = {
    "gpt": {},
    "llama": LLAMA,
    "parallel": dict(parallel_block=True),
    "mqa": dict(LLAMA, n_kv_heads=1),
    "wide-heads": dict(d_head=24, activation="gelu_tanh"),
    "qk-norm-per-head": dict(LLAMA, qk_norm="head", d_head=24),
    "qk-norm-full-width-qkv-bias": dict(LLAMA, qk_norm="full", qkv_bias=True),
    "qk-norm-layernorm": dict(qk_norm="head"),
    "mup-hooks": dict(embedding_multiplier=10.0, output_multiplier=0.25, attn_scale=1 / 16),
}


def test_meta_build_then_init_has_the_right_stds():
    cfg = small(n_layers=4, d_model=256, d_head=64, d_ffn=1024, init_std=0.02,
                embed_init_std=0.05, vocab_size=2048, max_seq_len=256)  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.tok_emb.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    p = dict(model.named_parameters())
    assert p["blocks.0.attn.wq.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * 4)
    assert p["blocks.3.attn.wo.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert p["blocks.1.mlp.w2.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert p["tok_emb.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    assert p["pos_emb.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.all(p["blocks.0.attn.wq.bias"] == 0) and torch.all(p["norm.weight"] == 1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model.init_weights()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


def test_rope_tables_are_buffers_not_state_and_are_recomputed():
    with torch.device("meta"):
        model = GPT(small(**LLAMA))
    model.to_empty(device="cpu")
    model.init_weights()
    assert not any("rope" in k for k in model.state_dict())
    assert model.rope_cos[0].eq(1).all() and model.rope_sin[0].eq(0).all()
    assert torch.allclose(model.rope_cos[5, 0], torch.tensor(math.cos(5.0)))


def test_parameter_names_and_shapes():
    model = GPT(small(**LLAMA))
    shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert shapes["tok_emb.weight"] == (101, 64) and shapes["head.weight"] == (101, 64)
    assert shapes["blocks.1.attn.wq.weight"] == (64, 64)
    assert shapes["blocks.1.attn.wk.weight"] == (32, 64)
    assert shapes["blocks.1.attn.wv.weight"] == (32, 64)
    assert shapes["blocks.1.attn.wo.weight"] == (64, 64)
    assert shapes["blocks.1.mlp.w1.weight"] == (128, 64) == shapes["blocks.1.mlp.w3.weight"]
    assert shapes["blocks.1.mlp.w2.weight"] == (64, 128)
    assert "pos_emb.weight" not in shapes and not any(k.endswith(".bias") for k in shapes)
    tied = dict(GPT(small()).named_parameters())
    assert "head.weight" not in tied and "pos_emb.weight" in tied
    assert "blocks.0.attn.wq.bias" in tied and "blocks.0.mlp_norm.bias" in tied
    par = dict(GPT(small(parallel_block=True)).named_parameters())
    assert not any("mlp_norm" in k for k in par)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_shapes_and_kv_cache_match_full_forward(variant):
    cfg = small(**VARIANTS[variant])
    model = GPT(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        assert full.shape == (2, 20, cfg.vocab_size)
        cache = KVCache.for_model(model, batch=2, max_len=32)
        parts = [model(tokens[:, :7], kv_cache=cache)]  # prefill
        parts.append(model(tokens[:, 7:12], kv_cache=cache, start_pos=7))  # chunked prefill
        for i in range(12, 20):  # one-token decode
            parts.append(model(tokens[:, i : i + 1], kv_cache=cache, start_pos=i))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_parallel_block_is_attn_plus_mlp_of_one_norm():
    model = GPT(small(parallel_block=True, n_layers=1)).eval()
    block = model.blocks["0"]
    x = torch.randn(1, 5, 64)
    h = block.attn_norm(x)
    expected = x + block.attn(h, None, None, 0) + block.mlp(h)
    torch.testing.assert_close(block(x, None, None, 0), expected)


def test_pipeline_stages_compose_to_the_full_model():
    cfg = small(**LLAMA, n_layers=4)
    full = GPT(cfg).eval()
    first, last = GPT(cfg).eval(), GPT(cfg).eval()
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    for i in ("2", "3"):
        del first.blocks[i]
    for i in ("0", "1"):
        del last.blocks[i]
    first.norm = first.head = None
    last.tok_emb = None
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 16, cfg.d_model)
        torch.testing.assert_close(last(hidden), full(tokens))


def test_multipliers_are_honoured():
    base = GPT(small()).eval()
    scaled = GPT(small(output_multiplier=0.5)).eval()
    scaled.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(scaled(tokens), base(tokens) * 0.5)
    emb = GPT(small(embedding_multiplier=3.0))
    emb.load_state_dict(base.state_dict())
    torch.testing.assert_close(emb.embed(tokens), base.embed(tokens) * 3.0)


def test_cross_entropy_is_fp32_mean_and_uniform_at_zero_logits():
    logits = torch.zeros(2, 3, 101, dtype=torch.bfloat16)
    loss = cross_entropy(logits, torch.randint(0, 101, (2, 3)))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(math.log(101), rel=1e-4)


def test_bf16_autocast_forward_and_cache():
    model = GPT(small(**LLAMA)).eval()
    tokens = torch.randint(0, 101, (1, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache.for_model(model, 1)
        assert cache.layers[0].k.dtype == torch.bfloat16
        logits = model(tokens, kv_cache=cache)
        step = model(tokens[:, :1], kv_cache=cache, start_pos=12)
    assert logits.dtype == torch.bfloat16 and step.shape == (1, 1, 101)


def test_positions_past_max_seq_len_are_an_error():
    with pytest.raises(ValueError, match="exceed max_seq_len 48"):
        GPT(small())(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_greedy_generation_is_deterministic_and_matches_argmax(variant):
    model = GPT(small(**VARIANTS[variant])).eval()
    prompt = torch.randint(0, 101, (2, 5))
    out = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=8, temperature=0))
    with torch.no_grad():  # the same tokens without a cache, one full forward per step
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_seeded_sampling_is_reproducible_and_filters_apply():
    model = GPT(small()).eval()
    prompt = torch.randint(0, 101, (1, 4))

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 16, temperature=1.5, generator=g, **kw)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    greedy = generate(model, prompt, 16, temperature=0)
    assert torch.equal(sample(5, top_k=1), greedy)
    assert torch.equal(sample(6, top_p=1e-6), greedy)


def test_generation_respects_max_seq_len_and_eos():
    model = GPT(small()).eval()
    long_prompt = torch.randint(0, 101, (1, 60))
    out = generate(model, long_prompt, max_new_tokens=10, temperature=0)
    assert out.shape == (1, 70)  # prompt cropped to the last 38 tokens for the model
    out = generate(model, torch.randint(0, 101, (1, 40)), max_new_tokens=100, temperature=0)
    assert out.shape == (1, 40 + 47)  # window: last prompt token + 47 new = max_seq_len
    prompt = torch.randint(0, 101, (1, 4))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 5)


def _sdpa_reference(q, k, v, scale):
    """fp32 scaled_dot_product_attention of the same inputs, and its input gradients."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    y = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale)
    return y, leaves


@pytest.mark.parametrize("scale", [None, 1 / 64])
def test_cpu_bf16_matmul_attention_matches_sdpa(scale):
    """The bf16 CPU path (explicit matmuls, fp32 softmax math) agrees with an fp32 reference as
    closely as torch's flash kernel does, outputs and all three input gradients."""
    from kiln.models.gpt import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(2, 3, 40, 16, generator=gen) for _ in range(4))
    ref, leaves = _sdpa_reference(q, k, v, scale)
    ref.backward(g)
    want = [ref.detach(), *(t.grad for t in leaves)]
    for impl in ("kiln", "flash"):
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        if impl == "kiln":
            y = attention(qb, kb, vb, None, True, scale, False)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                                 scale=scale)  # fmt: skip
        y.backward(g.bfloat16())
        got = [y, qb.grad, kb.grad, vb.grad]
        errs = [float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(got, want)]
        assert max(errs) < 0.03, (impl, errs)


def test_attention_uses_sdpa_outside_the_cpu_bf16_causal_case(monkeypatch):
    """fp32, masks, GQA and sequences over MATMUL_ATTENTION_MAX_LEN go to
    scaled_dot_product_attention unchanged (so fp32 parity with transformers is untouched)."""
    from kiln.models import attention as attention_module
    from kiln.models import gpt

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention",
                        lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])  # fmt: skip
    q = torch.randn(1, 2, 8, 4)
    gpt.attention(q, q, q, None, True, None, False)  # fp32
    gpt.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, True, None, True)  # GQA
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    gpt.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), mask, False, None, False)
    assert len(calls) == 3
    monkeypatch.setattr(attention_module, "MATMUL_ATTENTION_MAX_LEN", 4)
    gpt.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, True, None, False)
    assert len(calls) == 4
    monkeypatch.setattr(attention_module, "MATMUL_ATTENTION_MAX_LEN", 1024)
    gpt.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, True, None, False)
    assert len(calls) == 4  # the matmul path


def test_unknown_qk_norm_is_one_sentence():
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="model.qk_norm"):
        small(qk_norm="rms").validate()
