"""Per-rank training memory from the shape alone: parameters, gradients, optimizer state,
activations — for DDP or FSDP2, with or without activation checkpointing.

A pure function of (model shape, micro-batch, sequence length, precision, world size, data
parallel mode, activation checkpointing); nothing is allocated. Bytes, with N the parameter
count, W the data-parallel size, b·T the tokens of one micro-batch:

  parameters   fp32 master weights: 4N (DDP) or 4N/W + 4·N_block,max (FSDP2 gathers one block)
  gradients    fp32 .grad tensors: 4N (one process, DDP) or 4N/W + 4·N_block,max (FSDP2: the
               unsharded block being reduce-scattered); created during backward, since the
               trainer frees them after every step (zero_grad(set_to_none=True))
  grad buckets DDP's reducer keeps a second, persistent fp32 copy of the gradients: 4N
  optimizer    AdamW moments exp_avg and exp_avg_sq: 8N (DDP) or 8N/W (FSDP2)
  opt. temps   none for torch's fused AdamW (plain parameters: one process, DDP); FSDP2's
               DTensor shards use the foreach step, which builds one temporary copy of the
               local parameters (sqrt of exp_avg_sq): 4N/W
  activations  what autograd saves for backward, per layer per token (elements):
                 2 norm inputs + 2 norm outputs (4d), q, k, v (q + 2kv), attention output and
                 its reshaped copy (2q), MLP up-projection output(s) and activation
                 (2f, or 3f for SwiGLU)
               × bytes per element (4 fp32; 2 bf16, plus a 4-byte fp32 copy of the norm inputs
               autocast keeps) × L layers × b·T; with activation checkpointing only each block's
               input (d per token per layer) is kept, plus one block's full activations while it
               is recomputed. The head adds the final norm's input (fp32 d) and its output in
               the compute dtype (d), and the fused loss (kiln.models.loss) keeps the logit
               gradient in the compute dtype (V per token) plus two chunk buffers of
               chunk_rows(V) tokens (compute dtype and fp32). On CPU in bf16, causal
               attention up to MATMUL_ATTENTION_MAX_LEN tokens also keeps its bf16
               probabilities: 2·H·T² bytes per sequence per layer (kiln.models.gpt.attention).
               An MoE layer (:func:`moe_layer_bytes`) keeps, instead of the MLP's up
               projections, the router scores (fp32, E), the k routed copies of the token and
               the experts' outputs before and after the gate (3·k·d), the experts' up
               projections (2·k·f_e, 4·k·f_e for SwiGLU), the k gates, the int64 choices and
               dispatch indices, and the shared MLP's up projections; parameters, gradients
               and optimizer state count every expert (the total parameter count).

The peak is the larger of the backward peak — parameters + grad buckets + optimizer state +
activations + gradients — and the optimizer-step peak, parameters + grad buckets + gradients +
optimizer state + temporaries. In backward, activations are freed about as fast as gradients
appear, but the freed blocks rarely have the gradients' shapes: measured on this CPU (glibc
malloc), the peak resident set reaches activations + gradients by the second or third step
(tests/distributed/test_memory_estimate.py), so the estimate counts both.
Process overhead (the CUDA context or the CPython/torch runtime) is not included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.models.gpt import GPTConfig, uses_matmul_attention
from kiln.models.loss import chunk_rows
from kiln.planning.moe import expert_width, n_moe_layers
from kiln.planning.ops import block_params


@dataclass
class MemoryEstimate:
    """Bytes per rank for one training configuration."""

    params: int
    grads: int
    grad_buckets: int
    optimizer: int
    optimizer_temps: int
    activations: int
    world_size: int
    data: str
    activation_checkpointing: bool

    @property
    def peak(self) -> int:
        """max(backward peak, optimizer-step peak) — see the module docstring."""
        resident = self.params + self.grad_buckets + self.optimizer
        return resident + self.grads + max(self.activations, self.optimizer_temps)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("parameters (fp32)", self.params),
            ("gradients (fp32)", self.grads),
            ("DDP gradient buckets", self.grad_buckets),
            ("optimizer state (AdamW)", self.optimizer),
            ("optimizer step temporaries", self.optimizer_temps),
            ("activations", self.activations),
            ("peak", self.peak),
        ]


def _block_params(shape: GPTConfig) -> int:
    return block_params(shape)


def moe_layer_bytes(shape: GPTConfig, size: int) -> int:
    """Bytes per token an MoE layer's MLP keeps for backward (elements of ``size`` bytes in
    the compute dtype), measured against autograd's saved tensors in tests/unit/test_memory_moe.py:
    router scores 4·E, routed input, expert output and gated output 3·k·d, expert up
    projections k·up(f_e) (2·f_e, or 4·f_e for SwiGLU), gates k, int64 choices k and 2 or 3
    dispatch indices of k (token, slot, and the expert of each row when experts have biases),
    shared MLP up(f_s), the router logits and their logsumexp 4·(E + 1) with a z-loss; under
    bf16 the router reads the fp32 norm output
    (+(4 - size)·d). A few per-layer tensors of E elements are left out."""
    m, d = shape.moe, shape.d_model
    fe = expert_width(shape)
    per_width = 4 if shape.activation == "swiglu" else 2  # SwiGLU: h, silu(h), u, product
    up, shared = per_width * fe, per_width * m.shared_experts * fe
    k = m.top_k
    elems = k * (3 * d + up + 1) + shared
    scores = 4 * m.experts + 4 * (m.experts + 1) * bool(m.z_loss_coef)
    return size * elems + scores + 8 * k * (3 + bool(shape.bias)) + (4 - size) * d


def activation_bytes(
    shape: GPTConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    checkpointing: bool,
    device: str = "cpu",
) -> int:
    """Bytes autograd keeps for backward on one rank (see the module docstring)."""
    d, f, L, V = shape.d_model, shape.d_ffn, shape.n_layers, shape.vocab_size
    q, kv = shape.n_heads * shape.d_head, shape.n_kv_heads * shape.d_head
    up = 3 * f if shape.activation == "swiglu" else 2 * f
    per_token_layer = 4 * d + q + 2 * kv + 2 * q + up  # elements
    size = 2 if precision == "bf16" else 4
    layer_bytes = per_token_layer * size + (2 * d * 4 if precision == "bf16" else 0)
    tokens = micro_batch * seq_len
    embed = d * 4
    head = d * 4 + (d + V) * size
    chunk = min(chunk_rows(V), tokens) * V * (size + 4)
    probs = 0  # per layer, not per token
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if uses_matmul_attention(device, dtype, seq_len, gqa=shape.n_kv_heads != shape.n_heads):
        probs = micro_batch * shape.n_heads * seq_len**2 * 2
    n_moe = n_moe_layers(shape)  # their routed experts keep other tensors than the MLP's
    moe_extra = moe_layer_bytes(shape, size) - up * size if n_moe else 0
    if checkpointing:
        body = tokens * (L * d * 4 + layer_bytes + max(moe_extra, 0)) + probs
    else:
        body = L * (tokens * layer_bytes + probs) + n_moe * tokens * moe_extra
    return tokens * (embed + head) + body + chunk


def estimate_memory(
    shape: GPTConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "fp32",
    world_size: int = 1,
    data: str = "fsdp",
    activation_checkpointing: bool = False,
    device: str = "cpu",
) -> MemoryEstimate:
    """Per-rank memory of training ``shape`` with AdamW (see the module docstring)."""
    n = shape.num_params(include_embeddings=True)
    sharded = data == "fsdp" and world_size > 1
    local = -(-n // world_size) if sharded else n
    gathered = 4 * _block_params(shape) if sharded else 0
    return MemoryEstimate(
        params=4 * local + gathered,
        grads=4 * local + gathered,
        grad_buckets=4 * n if data == "ddp" and world_size > 1 else 0,
        optimizer=8 * local,
        optimizer_temps=4 * local if sharded else 0,
        activations=activation_bytes(
            shape, micro_batch, seq_len, precision, activation_checkpointing, device
        ),
        world_size=world_size,
        data=data if world_size > 1 else "1 process",
        activation_checkpointing=activation_checkpointing,
    )


def format_table(estimates: list[MemoryEstimate]) -> str:
    """One column per estimate, one row per component, in MiB."""
    heads = [
        f"{e.data}×{e.world_size}{' +AC' if e.activation_checkpointing else ''}" for e in estimates
    ]
    width = max(12, *(len(h) + 2 for h in heads))
    lines = ["per-rank memory (MiB)".ljust(28) + "".join(h.rjust(width) for h in heads)]
    for i, (label, _) in enumerate(estimates[0].rows()):
        cells = "".join(f"{e.rows()[i][1] / 2**20:,.1f}".rjust(width) for e in estimates)
        lines.append(f"  {label}".ljust(28) + cells)
    return "\n".join(lines)


def estimate_for_job(job, world_size: int) -> tuple[str, list[MemoryEstimate]]:
    """(description, estimates) for a JobConfig at ``world_size``: one process, or DDP and
    FSDP2, each without and with activation checkpointing. The vocabulary is data.vocab_size
    for a BPE tokenizer trained by Kiln (nothing is tokenised here), else the preset's."""
    from kiln.models.presets import resolve_model

    vocab = job.data.vocab_size if job.data.tokenizer == "bpe" else None
    shape, _ = resolve_model(job.model, vocab)
    if job.data.seq_len > shape.max_seq_len:
        from kiln.errors import ConfigError

        raise ConfigError(
            f"data.seq_len {job.data.seq_len} exceeds the model's context "
            f"(max_seq_len {shape.max_seq_len}); lower data.seq_len or raise model.max_seq_len."
        )
    job.validate(world_size)
    micro = job.train.micro_batch_size or job.train.batch_size // world_size
    modes = ["ddp", "fsdp"] if world_size > 1 else ["none"]
    device = job.run.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from kiln.planning.hardware import resolve_precision

    precision, _ = resolve_precision(job.train.precision, device)
    estimates = [
        estimate_memory(shape, micro, job.data.seq_len, precision, world_size, m, ac, device)
        for m in modes
        for ac in (False, True)
    ]
    n = shape.num_params(include_embeddings=True)
    active = shape.num_params(include_embeddings=True, active=True)
    count = f"{n:,}"
    if active != n:  # MoE: state for every expert, activations for the routed tokens
        count += f" (all experts; {active:,} active per token)"
    text = (
        f"model: {count} parameters ({shape.n_layers} layers, d_model {shape.d_model}, vocab "
        f"{shape.vocab_size}); micro-batch {micro} × {job.data.seq_len} tokens, "
        f"{precision}, {world_size} rank(s)"
    )
    return text, estimates
