"""Causal self-attention of the GPT in kiln.models.gpt: RoPE (inverse frequencies, scaling,
rotation), the KV cache for incremental decoding, :func:`attention` (SDPA, or two bf16 matmuls on
CPU) and the :class:`Attention` module with its q/k/v/o projections and optional q/k norms."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError, check_choice
from kiln.models.layers import init_linears, make_norm
from kiln.models.loss import compute_dtype

if TYPE_CHECKING:
    from kiln.models.gpt import GPT, GPTConfig


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    required = {
        "linear": {"factor"},
        "llama3": {
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        },
    }
    kind = scaling.get("rope_type", scaling.get("type"))
    check_choice("model", "rope_scaling.rope_type", str(kind), list(required))
    missing = sorted(required[kind] - set(scaling))
    if missing:
        raise ConfigError(f"model.rope_scaling of type {kind!r} is missing {', '.join(missing)}.")


def rope_inv_freq(cfg: GPTConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d_head), i < d_head/2, with optional scaling (fp32).

    llama3 scaling (Llama 3.1): wavelengths longer than original_len / low_freq_factor are
    divided by ``factor``; shorter than original_len / high_freq_factor are kept; in between
    the two are blended with s = (original_len / wavelength - low) / (high - low).
    """
    exponent = torch.arange(0, cfg.d_head, 2, dtype=torch.int64).float() / cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor = float(s["factor"])
    if s.get("rope_type", s.get("type")) == "linear":
        return inv_freq / factor
    old_len = float(s["original_max_position_embeddings"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, d_head] with cos/sin [T, d_head/2] (HF Llama layout)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerKV:
    """One layer's preallocated keys and values [B, n_kv_heads, max_len, d_head]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v for positions start_pos.. and return views of everything up to them."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions but {end} are needed.")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys/values of every layer for incremental decoding; ``length`` = positions filled."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        d_head: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, d_head)
        self.layers = [
            LayerKV(
                torch.empty(shape, dtype=dtype, device=device),
                torch.empty(shape, dtype=dtype, device=device),
            )
            for _ in range(n_layers)
        ]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(
        cls, model: GPT, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache sized for ``model``; dtype defaults to the autocast dtype if active."""
        cfg = model.config
        param = next(model.parameters())
        if dtype is None:
            kind = param.device.type
            on = torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind) if on else param.dtype
        return cls(
            cfg.n_layers,
            batch,
            cfg.n_kv_heads,
            max_len or cfg.max_seq_len,
            cfg.d_head,
            dtype=dtype,
            device=param.device,
        )


MATMUL_ATTENTION_MAX_LEN = 1024
"""Longest sequence for which CPU bf16 attention keeps its [B, H, T, T] probabilities."""


def uses_matmul_attention(
    device_type: str, dtype: torch.dtype, seq_len: int, gqa: bool, allowed: bool = True
) -> bool:
    """Whether causal, unmasked self-attention of ``seq_len`` tokens takes :func:`attention`'s
    matmul path (which keeps its probabilities for backward) rather than SDPA; ``allowed``
    False (SDPA measured faster on this CPU, kiln.models.cpu_attention) rules it out."""
    return (
        allowed
        and device_type == "cpu"
        and dtype == torch.bfloat16
        and not gqa
        and 1 < seq_len <= MATMUL_ATTENTION_MAX_LEN
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    gqa: bool,
    matmul_ok: bool = True,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over [B, H, T, d_head] tensors.

    torch's scaled_dot_product_attention everywhere but in one case: causal self-attention
    without a mask, GQA or cache, in bf16 on CPU, up to MATMUL_ATTENTION_MAX_LEN tokens. There
    the flash kernel runs at under 100 GFLOP/s, while two bf16 matmuls around a softmax
    computed in fp32 (its output rounded to bf16, as the flash kernel rounds P before P·V) are
    2.5× faster for forward + backward at B=4, H=12, T=512, d=64 (25 vs 65 ms), with the same
    error against an fp32 reference (benchmarks/cpu_attention.py). The price is memory:
    backward keeps the bf16 probabilities, 2·H·T² bytes per sequence per layer. Which one is
    faster depends on the CPU and its load (on an AMX Xeon the flash kernel measured 2.3×
    faster than this path in one run, within 10% of it in another), so ``matmul_ok`` False
    sends this case to SDPA too: the trainer times both on the run's shape at start
    (kiln.models.cpu_attention) and sets it on every :class:`Attention`."""
    T = q.shape[-2]
    if (
        causal
        and mask is None
        and k.shape[-2] == T
        and uses_matmul_attention(q.device.type, q.dtype, T, gqa, matmul_ok)
    ):
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = (q * (scale if scale is not None else q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
        return torch.softmax(scores + future, dim=-1) @ v
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (see :func:`attention`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.scale, self.qk_norm = cfg.attn_scale, cfg.qk_norm
        q_out, kv_out = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, q_out, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_out, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_out, bias=qkv_bias)
        self.wo = nn.Linear(q_out, cfg.d_model, bias=cfg.bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm != "none":
            head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, cfg.d_head if head else q_out)
            self.k_norm = make_norm(cfg, cfg.d_head if head else kv_out)
        self.matmul_attention = True
        """False: causal bf16 CPU attention through SDPA too (see :func:`attention`)."""

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        """q/k/v N(0, init_std), the output projection N(0, out_std), biases 0, q/k norms 1."""
        init_linears(self, [self.wq, self.wk, self.wv], init_std)
        init_linears(self, [self.wo], out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def _heads(self, x: torch.Tensor, linear: nn.Linear, norm: nn.Module | None) -> torch.Tensor:
        """linear(x) as [B, heads, T, d_head], through the q/k norm where there is one: over the
        whole projected width ('full') or over each head ('head')."""
        B, T, _ = x.shape
        y = linear(x)
        if norm is not None and self.qk_norm == "full":
            y = norm(y)
        y = y.view(B, T, -1, self.d_head)
        if norm is not None and self.qk_norm == "head":
            y = norm(y)
        return y.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerKV | None,
        start_pos: int,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        x = x.to(compute_dtype(x))  # one cast of the (fp32-normed) input for q, k and v
        q, k = self._heads(x, self.wq, self.q_norm), self._heads(x, self.wk, self.k_norm)
        v = self._heads(x, self.wv, None)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, causal = None, T > 1
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
            if start_pos > 0 and T > 1:  # chunked prefill: query i sees keys <= start_pos + i
                rows = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
                mask = rows >= torch.arange(start_pos + T, device=x.device)[None, :]
                causal = False
            elif start_pos > 0:  # one new token sees every cached key
                causal = False
        if attn_mask is not None:  # caller-built mask (True = may attend) replaces causality
            mask, causal = attn_mask, False
        gqa = self.n_kv_heads != self.n_heads
        y = attention(q, k, v, mask, causal, self.scale, gqa, self.matmul_attention)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))
