"""Parameter and training-FLOP counts for GPT-family shapes, as plain arithmetic.

Two FLOP conventions live here, because two different numbers are in common use:

**Model FLOPs (used for MFU)** — the PaLM / Megatron-LM convention, :func:`flops_per_token`::

    C_token = 6·N_mm + 12·L·S·d_attn

``N_mm`` are the parameters that take part in a matmul: every non-embedding parameter plus the
output head ``V·d`` (tied or not; the embedding *lookup* and learned positions cost no FLOPs).
``6 = 2`` (multiply-add) ``× 3`` (forward, and a backward that computes gradients for both
activations and weights). ``12·L·S·d_attn`` is QKᵀ and attention-times-values (``2·S·d_attn``
each in the forward, ×3), counted over the full ``S × S`` score matrix as PaLM does, without
halving for the causal mask and without recomputation. MFU = achieved model FLOPs / peak.

**Published Cerebras-GPT column** — :func:`cerebras_flops_per_token`::

    C_token = 6·N + 30·L·S·d_attn        (N = all parameters, embeddings included)

This is the convention that reproduces the "Training FLOPs" column of the Cerebras-GPT model
cards and paper (2.6e18 … 2.3e22) within 3% for all seven models. Worked example, 111M
(L=10, d=768, S=2048, N=111,050,496, D=2.22e9 tokens)::

    6·N          = 6.663e8
    30·L·S·d     = 30·10·2048·768 = 4.719e8
    per token    = 1.138e9;   × 2.22e9 tokens = 2.53e18   (published 2.6e18, −2.8%)

Plain 6ND gives 1.48e18 (−43%) and PaLM's 6N+12LSd 1.90e18 (−27%). The Chinchilla
appendix-F count (embeddings, QKV, QKᵀ, softmax, AV, output projection, MLP, logits; backward
= 2× forward) with full attention comes out 6–12% low for every model, and with activation
recomputation (4× forward) 17–25% high; halving attention for causality makes both worse. A
free fit of a·N + b·L·S·d to the seven published points gives a≈5.8, b≈33, so the attention
weight of ~30 is what the published numbers imply; we could not derive the 30 from first
principles (it is 2.5× the Megatron term) and record it as an empirical convention. Use it
only to compare with the published table, never for MFU. :func:`chinchilla_flops_per_token`
is kept for reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kiln.planning import ops


class ShapeLike(Protocol):
    """What the counts read from a model shape (kiln.models.gpt's shape satisfies it)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ffn: int
    vocab_size: int
    max_seq_len: int


@dataclass(frozen=True)
class Shape:
    """A minimal GPT shape for planning (pure data; mirrors kiln.models.gpt's fields)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_ffn: int
    vocab_size: int = 50257
    max_seq_len: int = 2048
    n_kv_heads: int | None = None
    d_head: int | None = None
    activation: str = "gelu"
    tie_embeddings: bool = True
    bias: bool = True
    position: str = "learned"
    norm: str = "layernorm"
    moe: Any = None
    """Mixture-of-experts section (kiln.config.MoEConfig) or None; see kiln.planning.moe."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with d_head and n_kv_heads resolved."""
        d = asdict(self)
        d["d_head"] = _d_head(self)
        d["n_kv_heads"] = _kv_heads(self)
        return d


def _d_head(s: Any) -> int:
    return getattr(s, "d_head", None) or s.d_model // s.n_heads


def _kv_heads(s: Any) -> int:
    return getattr(s, "n_kv_heads", None) or s.n_heads


def _d_attn(s: Any) -> int:
    """Width of the concatenated query heads (n_heads · d_head)."""
    return s.n_heads * _d_head(s)


def param_count(shape: ShapeLike, include_embeddings: bool = True) -> int:
    """Parameter count, summed over the op-level description (kiln.planning.ops).

    ``N = V·d + S·d (learned positions) + L·layer + final norm + V·d (untied head only)``.
    An untied head counts as non-embedding (it is a matmul); ``include_embeddings=False``
    drops only the token and position tables.
    """
    return ops.param_count(shape, include_embeddings)


def matmul_params(shape: ShapeLike) -> int:
    """Parameters used in a matmul per token: non-embedding plus the output head V·d."""
    return ops.matmul_params(shape)


def flops_6nd_plus_attention(shape: ShapeLike, seq_len: int) -> float:
    """Model FLOPs per token, PaLM/Megatron convention: 6·N_mm + 12·L·S·d_attn, both terms
    summed over the op-level description (the attention term is its QKᵀ and A·V ops)."""
    return ops.model_flops_per_token(shape, seq_len)


def flops_per_token(shape: ShapeLike, seq_len: int) -> float:
    """Training FLOPs per token used for MFU (the 6N + 12·L·S·d model-FLOPs convention)."""
    return flops_6nd_plus_attention(shape, seq_len)


def cerebras_flops_per_token(shape: ShapeLike, seq_len: int) -> float:
    """FLOPs per token in the convention of the published Cerebras-GPT table: 6N + 30·L·S·d."""
    # 30·L·S·d = 2.5 × the 12·L·S·d of the attention matmuls in the op description
    n_active = ops.param_count(shape, active=True)  # an MoE token uses top_k of its experts
    return 6.0 * n_active + 2.5 * ops.attention_flops_per_token(shape, seq_len)


def chinchilla_flops_per_token(
    shape: ShapeLike, seq_len: int, *, causal: bool = False, recompute: bool = False
) -> float:
    """Hoffmann et al. (2022) appendix F count, per token, for reference.

    Forward = embeddings 2Vd + L·(QKV 2·d·(q+2kv) + QKᵀ 2·S·q + softmax 3·h·S + AV 2·S·q
    + output 2·q·d + MLP 2·m·d·f) + logits 2·d·V; training = 3× forward (4× with full
    activation recomputation). ``causal`` halves the QKᵀ and AV terms.
    """
    d, f, s, v = shape.d_model, shape.d_ffn, seq_len, shape.vocab_size
    q, kv = _d_attn(shape), _kv_heads(shape) * _d_head(shape)
    n_mats = 3 if getattr(shape, "activation", "gelu") == "swiglu" else 2
    core = (2 * s * q + 2 * s * q) * (0.5 if causal else 1.0) + 3 * shape.n_heads * s
    layer = 2 * d * (q + 2 * kv) + core + 2 * q * d + 2 * n_mats * d * f
    forward = 2 * v * d + shape.n_layers * layer + 2 * d * v
    return (4.0 if recompute else 3.0) * forward


def training_flops(
    shape: ShapeLike, tokens: float, seq_len: int, convention: str = "model"
) -> float:
    """Total training FLOPs for ``tokens`` tokens.

    ``convention``: 'model' (6N + 12·L·S·d, used for MFU), '6nd' (6·N·D, all parameters),
    'cerebras' (6N + 30·L·S·d, reproduces the published Cerebras-GPT column) or 'chinchilla'.
    """
    per_token = {
        "model": flops_per_token,
        "cerebras": cerebras_flops_per_token,
        "chinchilla": chinchilla_flops_per_token,
        "6nd": lambda s, _seq: 6.0 * param_count(s),
    }
    if convention not in per_token:
        from kiln.errors import ConfigError

        raise ConfigError(
            f"FLOP convention {convention!r} is unknown; use one of {', '.join(per_token)}."
        )
    return per_token[convention](shape, seq_len) * float(tokens)


def cerebras_flops(shape: ShapeLike, tokens: float, seq_len: int = 2048) -> float:
    """Training FLOPs as the Cerebras-GPT table counts them (see the module docstring)."""
    return training_flops(shape, tokens, seq_len, convention="cerebras")
