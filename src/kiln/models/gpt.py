"""One plain single-device GPT: GPT-2/3 and Cerebras-GPT shapes, plus Llama-style variants.

Parallelism is applied from outside (kiln.distributed), so this file stays readable and imports
no torch.distributed. Parameter names are a contract other modules rely on (Hugging Face
conversion, sparsity masks, tensor-parallel plans)::

    tok_emb.weight                      [vocab, d_model]
    pos_emb.weight                      [max_seq_len, d_model]          (position='learned')
    blocks.{i}.attn_norm.{weight,bias}
    blocks.{i}.attn.{wq,wk,wv,wo}.{weight,bias}   (q/k/v biases also with qkv_bias)
    blocks.{i}.attn.{q_norm,k_norm}.{weight,bias}                      (qk_norm 'head'/'full')
    blocks.{i}.mlp_norm.{weight,bias}                                   (not parallel_block)
    blocks.{i}.mlp.{w1,w2,w3}.{weight,bias}   w1 = up (gate for swiglu), w2 = down, w3 = swiglu up
    blocks.{i}.mlp.{router,experts,shared}.*   MoE layers (cfg.moe; see kiln.models.moe)
    norm.{weight,bias}
    head.weight                         [vocab, d_model]                (not tie_embeddings)

Build on the meta device, parallelize, then allocate and initialise::

    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import MoEConfig
from kiln.errors import ConfigError, check_choice
from kiln.models.attention import (  # noqa: F401  (re-exported: kiln.models.gpt.attention)
    MATMUL_ATTENTION_MAX_LEN,
    Attention,
    KVCache,
    LayerKV,
    _check_rope_scaling,
    apply_rope,
    attention,
    rope_inv_freq,
    uses_matmul_attention,
)
from kiln.models.layers import (  # noqa: F401  (re-exported)
    GeluMLP,
    SwiGLUMLP,
    init_linears,
    make_mlp,
    make_norm,
)
from kiln.models.loss import head_loss


@dataclass(kw_only=True)
class GPTConfig:
    """A fully resolved model shape (sizes as data). Build one with kiln.models.presets."""

    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual stream width."""
    n_heads: int
    """Number of query heads."""
    n_kv_heads: int
    """Number of key/value heads (< n_heads: grouped-query attention; 1: multi-query)."""
    d_head: int
    """Width of one attention head (need not equal d_model / n_heads)."""
    d_ffn: int
    """Hidden width of the MLP."""
    vocab_size: int
    """Rows of the token embedding and the output head."""
    max_seq_len: int
    """Longest context: size of the learned position table, the RoPE table and KV caches."""
    position: str = "learned"
    """'learned' (GPT-2/3) or 'rope' (Llama, rotate-half convention as in Hugging Face)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling: {'rope_type': 'linear', 'factor'} or {'rope_type': 'llama3',
    'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'}."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    activation: str = "gelu"
    """'gelu' (exact erf), 'gelu_tanh' (GPT-2's gelu_new) or 'swiglu' (Llama)."""
    bias: bool = True
    """Biases in every linear layer (except the head) and in layernorms."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections even when ``bias`` is off (Qwen2)."""
    qk_norm: str = "none"
    """Normalise queries and keys (model.norm kind) after their projections, before RoPE:
    'none', 'head' (over each head's d_head, Qwen3) or 'full' (over the whole projected q and
    k widths, OLMoE)."""
    tie_embeddings: bool = True
    """Logits use tok_emb.weight; no separate head parameter."""
    parallel_block: bool = False
    """x = x + attn(norm(x)) + mlp(norm(x)) with one norm (GPT-J/PaLM)."""
    init_std: float = 0.02
    """Std of linear weights; output projections use init_std / sqrt(2 * n_layers)."""
    embed_init_std: float = 0.02
    """Std of the token and position embeddings."""
    embedding_multiplier: float = 1.0
    """μP hook: the embedding output (token + position) is multiplied by this."""
    output_multiplier: float = 1.0
    """μP hook: logits are multiplied by this."""
    attn_scale: float | None = None
    """Softmax scale on q·k; None = 1/sqrt(d_head) (μP uses 1/d_head)."""
    width_mult: float = 1.0
    """μP width multiplier d_model / base width (informational; the multipliers carry it)."""
    moe: MoEConfig | None = None
    """Mixture-of-experts MLPs (None or experts 0 = dense; see kiln.models.moe)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from a saved model_shape
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not self.moe.enabled:
            self.moe = None

    def validate(self) -> GPTConfig:
        """Raise ConfigError (one sentence) for a shape that cannot be built; return self."""
        for name in (
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "d_head",
            "d_ffn",
            "vocab_size",
            "max_seq_len",
            "rope_theta",
            "norm_eps",
            "init_std",
            "embed_init_std",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"model.{name} is {value} but must be > 0.")
        check_choice("model", "position", self.position, ["learned", "rope"])
        check_choice("model", "norm", self.norm, ["layernorm", "rmsnorm"])
        check_choice("model", "activation", self.activation, ["gelu", "gelu_tanh", "swiglu"])
        check_choice("model", "qk_norm", self.qk_norm, ["none", "head", "full"])
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_kv_heads {self.n_kv_heads} does not divide model.n_heads "
                f"{self.n_heads}; choose a divisor of {self.n_heads} (1 = multi-query)."
            )
        if self.position == "rope" and self.d_head % 2 != 0:
            raise ConfigError(f"model.d_head is {self.d_head} but RoPE needs an even d_head.")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.moe is not None:
            self.moe.validate()
        return self

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count from the shape alone (equals the module's count), summed over the
        op-level description of the model (kiln.planning.ops), plus what MoE layers add.

        "Embeddings" are the token and learned-position tables; an untied head counts as
        non-embedding (it is a matmul in every forward, unlike a table lookup). ``active``
        counts only the experts one token uses (kiln.planning.moe).
        """
        from kiln.planning.ops import param_count

        return param_count(self, include_embeddings, active)

    def replace(self, **changes: Any) -> GPTConfig:
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


class Block(nn.Module):
    """Pre-norm block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg, layer)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        """Each sub-layer initialises itself, in parameter order (see GPT.init_weights)."""
        self.attn_norm.reset_parameters()
        self.attn.init_weights(init_std, out_std)
        self.mlp_norm.reset_parameters()
        self.mlp.init_weights(init_std, out_std)

    def forward(self, x, rope, cache, start_pos, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), rope, cache, start_pos, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class ParallelBlock(nn.Module):
    """GPT-J/PaLM block: h = norm(x); x = x + attn(h) + mlp(h)."""

    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = make_mlp(cfg, layer)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.attn.init_weights(init_std, out_std)
        self.mlp.init_weights(init_std, out_std)

    def forward(self, x, rope, cache, start_pos, attn_mask=None):
        h = self.attn_norm(x)
        return x + self.attn(h, rope, cache, start_pos, attn_mask) + self.mlp(h)


class GPT(nn.Module):
    """Decoder-only transformer. A pipeline stage may set tok_emb (and pos_emb) to None — the
    input is then hidden states — and/or norm and head to None — the output is then hidden
    states. Blocks live in a ModuleDict keyed "0".."L-1" so names survive splitting."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: nn.Embedding | None = None
        if cfg.position == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        block_cls = ParallelBlock if cfg.parallel_block else Block
        self.blocks = nn.ModuleDict({str(i): block_cls(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg)
        self.head: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.position == "rope":
            half = cfg.d_head // 2
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.output_hidden = False
        """True: forward returns the final-normed hidden states and a loss component applies
        the head (kiln.models.loss.head_loss, or loss-parallel under TP), as training does."""
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: linears N(0, init_std), output projections (attn.wo, mlp.w2)
        N(0, init_std / sqrt(2 n_layers)), embeddings N(0, embed_init_std), biases 0, norms 1.
        Each block initialises itself (a new block class brings its own init_weights), in
        parameter order, so the result is deterministic under torch.manual_seed; a pipeline
        stage skips what it does not hold. Recomputes the RoPE tables."""
        for _, module, init in self.init_units():
            init(module)
        self.init_buffers()

    def init_units(self) -> list[tuple[str, nn.Module, Callable[[nn.Module], None]]]:
        """(name, module, its initialiser) for each part this model holds, in initialisation
        order — the order that fixes the RNG stream. kiln.distributed.materialize walks the
        whole model's units to initialise a sharded one to the same values."""
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def normal(std: float) -> Callable[[nn.Module], None]:
            return lambda m: nn.init.normal_(m.weight, 0.0, std)

        units = [("tok_emb", self.tok_emb, normal(cfg.embed_init_std)),
                 ("pos_emb", self.pos_emb, normal(cfg.embed_init_std))]  # fmt: skip
        for key, block in self.blocks.items():
            units.append((f"blocks.{key}", block, lambda b: b.init_weights(cfg.init_std, out_std)))
        units.append(("norm", self.norm, lambda m: m.reset_parameters()))
        units.append(("head", self.head, normal(cfg.init_std)))
        return [unit for unit in units if unit[1] is not None]

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the model's own derived buffers (the RoPE tables)."""
        cfg = self.config
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg).to(self.rope_cos.device)
            t = torch.arange(cfg.max_seq_len, device=inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            self.rope_cos.copy_(freqs.cos())
            self.rope_sin.copy_(freqs.sin())

    def embed(
        self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token (+ learned position) embeddings × embedding_multiplier."""
        h = self.tok_emb(tokens)
        if self.pos_emb is not None and positions is not None:
            h = h + self.pos_emb.weight[positions]
        elif self.pos_emb is not None:
            h = h + self.pos_emb.weight[start_pos : start_pos + tokens.shape[1]]
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        return h

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's [vocab, d_model] matrix (the token embedding when tied)."""
        return self.head.weight if self.head is not None else self.tok_emb.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states → logits (one matmul, × output_multiplier)."""
        logits = F.linear(h, self.head_weight)
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        return logits

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, then logits."""
        return self.logits(self.norm(h))

    def forward(
        self,
        tokens: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, d] when tok_emb is None) → logits
        [B, T, vocab] in the compute dtype (hidden states when norm is None; final-normed hidden
        states when ``output_hidden``, the training contract: the loss component applies the
        head).

        With ``targets`` [B, T] (int, -100 = ignore), returns the mean next-token cross entropy
        instead (fp32 scalar), through :func:`kiln.models.loss.head_loss`: the head and the
        loss fused a chunk of tokens at a time, never holding fp32 [B, T, vocab] logits.

        With ``kv_cache``, the tokens sit at positions start_pos .. start_pos+T-1 and attend to
        the cached keys before them (prefill, chunked prefill and one-token decode alike).

        Without a cache, ``positions`` [B, T] (int) and ``attn_mask`` [B, 1, T, T] (bool, True =
        may attend) give every token its own position and visible keys instead of 0..T-1 and
        causality: several sequences sharing a prefix can be packed into one row (eval scorer)."""
        T = tokens.shape[1]
        if attn_mask is not None and kv_cache is not None:
            raise ValueError("attn_mask cannot be combined with a kv_cache.")
        if positions is not None:
            if attn_mask is None:
                raise ValueError("positions need an attn_mask.")
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"positions exceed max_seq_len {self.config.max_seq_len}.")
        elif start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + T} exceed max_seq_len {self.config.max_seq_len}."
            )
        h = self.embed(tokens, start_pos, positions) if self.tok_emb is not None else tokens
        rope = None
        if self.config.position == "rope" and positions is not None:  # [B, 1, T, d_head / 2]
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        elif self.config.position == "rope":
            rope = (
                self.rope_cos[start_pos : start_pos + T],
                self.rope_sin[start_pos : start_pos + T],
            )
        for name, block in self.blocks.items():
            cache = kv_cache.layers[int(name)] if kv_cache is not None else None
            if attn_mask is None:
                h = block(h, rope, cache, start_pos)
            else:
                h = block(h, rope, cache, start_pos, attn_mask)
        if kv_cache is not None:
            kv_cache.length = start_pos + T
        if self.norm is None:
            if targets is not None:
                raise ValueError("targets need the final norm and head (this stage has none).")
            return h
        h = self.norm(h)
        if targets is not None:
            return head_loss(self, h, targets)
        return h if self.output_hidden else self.logits(h)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
    )
