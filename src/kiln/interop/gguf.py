"""GGUF (llama.cpp) → Kiln GPT: Llama-architecture files, any quantisation ``gguf`` dequantises.

llama.cpp's converter permutes the rows of q and k from Hugging Face's rotate-half RoPE layout
into interleaved pairs: per head, rows [h0..h(d/2-1), h(d/2)..h(d-1)] become
[h0, h(d/2), h1, h(d/2+1), ...], i.e. ``w.reshape(n, 2, d/2, in).swapaxes(1, 2)``. We undo it
with the inverse ``w.reshape(n, d/2, 2, in).swapaxes(1, 2)`` (n = query or key/value heads).

The tokenizer is rebuilt from the file's ``tokenizer.ggml.*`` metadata as a Hugging Face
``tokenizers`` byte-level BPE (tokens + merges); the pre-tokenizer follows
``tokenizer.ggml.pre`` (gpt2 regex; smollm = single digits first; llama-bpe = Llama 3 regex).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.models.gpt import GPTConfig

NAMES = {
    "attn_norm": "attn_norm",
    "mlp_norm": "ffn_norm",
    "attn.wq": "attn_q",
    "attn.wk": "attn_k",
    "attn.wv": "attn_v",
    "attn.wo": "attn_output",
    "mlp.w1": "ffn_gate",
    "mlp.w3": "ffn_up",
    "mlp.w2": "ffn_down",
}
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise KilnError("reading GGUF needs the gguf package (pip install 'kiln[interop]').") from e
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error on a foreign file
        raise KilnError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0]}).") from e


def metadata(reader) -> dict[str, Any]:
    """Every key/value field except the tensor index, as Python values."""
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (see module docstring)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (HF rotate-half rows → interleaved); used to write test files."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict[str, Any], n_vocab: int, has_output: bool) -> GPTConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise KilnError(f"GGUF architecture is {arch!r} but only 'llama' files convert.")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise KilnError(f"GGUF metadata lacks llama.{name}.")
        return value

    d, h = int(key("embedding_length")), int(key("attention.head_count"))
    scaling = None
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif kind not in ("none", None):
        raise KilnError(f"GGUF rope scaling type {kind!r} is not supported (use linear).")
    return GPTConfig(
        n_layers=int(key("block_count")), d_model=d, n_heads=h,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv") or h),
        d_head=int(meta.get("llama.attention.key_length") or d // h),
        d_ffn=int(key("feed_forward_length")), vocab_size=n_vocab,
        max_seq_len=int(key("context_length")), position="rope",
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        norm="rmsnorm", norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        activation="swiglu", bias=False, tie_embeddings=not has_output,
    ).validate()  # fmt: skip


def _tensors(reader) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    return out


def load_gguf_state(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Any]:
    """(shape, Kiln state dict in fp32, kiln Tokenizer) of a Llama GGUF file."""
    reader = _reader(path)
    meta = metadata(reader)
    ts = _tensors(reader)
    if "rope_freqs.weight" in ts:
        raise KilnError(f"{path} carries rope_freqs (llama3 rope scaling), which is not supported.")
    if "token_embd.weight" not in ts:
        raise KilnError(f"{path} has no token_embd.weight tensor.")
    cfg = config_from_gguf(meta, ts["token_embd.weight"].shape[0], "output.weight" in ts)
    sd = {"tok_emb.weight": ts["token_embd.weight"], "norm.weight": ts["output_norm.weight"]}
    if not cfg.tie_embeddings:
        sd["head.weight"] = ts["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in NAMES.items():
            name = f"blk.{i}.{theirs}.weight"
            if name not in ts:
                raise KilnError(f"{path} lacks tensor {name}.")
            w = ts[name]
            if ours == "attn.wq":
                w = unpermute(w, cfg.n_heads)
            elif ours == "attn.wk":
                w = unpermute(w, cfg.n_kv_heads)
            sd[f"blocks.{i}.{ours}.weight"] = w
    return cfg, sd, tokenizer_from_gguf(meta, path)


def tokenizer_from_gguf(meta: dict[str, Any], path: Path):
    """A kiln Tokenizer (HF tokenizers BPE) from tokenizer.ggml.{model,tokens,merges,pre}."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from kiln.data.tokenizer import Tokenizer

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise KilnError(
            f"{path} has a {model!r} tokenizer but only gpt2-style BPE tokenizers convert."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    hf = HFTokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    elif pre in ("gpt2", "default", "gpt-2"):
        hf.pre_tokenizer = byte_level
    else:
        raise KilnError(f"{path} uses the {pre!r} pre-tokenizer, which is not supported.")
    hf.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = [t for t, kind in zip(tokens, types) if kind == 3]  # CONTROL tokens
    if special:
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return Tokenizer(hf)
