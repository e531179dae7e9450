"""The mixture-of-experts MLP: a token-choice router and experts stored as 3-D weights.

An MoE layer replaces a block's dense MLP (``blocks.{i}.mlp``) and keeps the block untouched
(kiln.models.gpt picks the class per layer from ``GPTConfig.moe``). Parameter names::

    blocks.{i}.mlp.router.weight        [E, d]      router logits z = x Wᵀ (fp32)
    blocks.{i}.mlp.router.expert_bias   [E]         buffer: DeepSeek-V3 balancing bias
    blocks.{i}.mlp.experts.w1           [E, f, d]   up (gate for swiglu), like nn.Linear rows
    blocks.{i}.mlp.experts.w2           [E, d, f]   down
    blocks.{i}.mlp.experts.w3           [E, f, d]   swiglu up
    blocks.{i}.mlp.experts.b1, b2       [E, f], [E, d]   (bias=True shapes)
    blocks.{i}.mlp.shared.{w1,w2,w3}    one dense MLP of width shared_experts · f (optional)
    blocks.{i}.mlp.shared_gate.weight   [1, d]      sigmoid gate on the shared MLP (optional)

Forward for N tokens x ``[N, d]``:

1. scores s = softmax(z) or sigmoid(z); the k experts with the largest s + bias are chosen
   (the bias only steers the choice); gate g = s of the chosen (renormalised to sum 1 with
   ``normalize_top_k``).
2. The N·k (token, expert) assignments are sorted by expert, first choices before second
   ones, tokens in order within each (a stable sort of the k-major list). With a capacity
   factor c, an expert keeps its first C = ceil(c·N·k/E) assignments and the rest are
   dropped (the token then gets nothing from that expert: the residual carries it).
3. The tokens are cast to the compute dtype (bf16 under autocast) and their rows gathered in
   that order. The experts run on their contiguous rows (kiln.models.moe_kernels): one grouped GEMM
   (``torch._grouped_mm``), one batched GEMM over rows zero-padded per expert, or a loop over
   experts, by default whichever measured fastest at first use for the shape;
   y = Σ_k g · expert(x) is scattered back with index_add.

Load balancing, each optional: the Switch auxiliary loss α·E·Σᵢ fᵢ·Pᵢ (fᵢ = share of the N·k
assignments routed to expert i before any drop, Pᵢ = mean router probability of i; equals α
when perfectly balanced), the router z-loss β·mean(logsumexp(z)²), and the auxiliary-loss-free
bias update bᵢ += γ·sign(mean load − loadᵢ) after each optimizer step. The losses are recorded
on the module during a training forward and collected by :func:`pop_aux_loss`, the seam the
training loss uses (it does not depend on where the cross entropy is computed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.loss import compute_dtype
from kiln.models.moe_kernels import choose_expert_kernel, expert_mlp, grouped_mm_supported
from kiln.planning.moe import expert_width


@dataclass
class Dispatch:
    """Where each kept (token, expert) assignment goes; rows are sorted by expert."""

    slot: torch.Tensor
    """[M] index into the k-major flattened assignments (k·N) of each kept row."""
    token: torch.Tensor
    """[M] token index of each row."""
    counts: torch.Tensor
    """[E] kept rows per expert (int64)."""
    routed: torch.Tensor
    """[E] assignments per expert before any drop."""
    dropped: int
    """Assignments dropped by the capacity limit."""


def dispatch(choice: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Sort the [N, k] expert choices by expert (first choices first) and apply a capacity."""
    n_tok = choice.shape[0]
    flat = choice.t().reshape(-1)
    slot = torch.argsort(flat, stable=True)
    routed = torch.bincount(flat, minlength=n_experts)
    counts, dropped = routed, 0
    if capacity is not None:
        starts = routed.cumsum(0) - routed
        rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[slot]]
        slot = slot[rank < capacity]
        counts = routed.clamp(max=capacity)
        dropped = int(flat.numel() - slot.numel())
    return Dispatch(slot, slot % n_tok, counts, routed, dropped)


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float | None) -> int | None:
    """Token slots per expert, ceil(factor · N · k / E); None when dropless."""
    if factor is None:
        return None
    return math.ceil(factor * n_tokens * top_k / n_experts)


class GroupedExperts(nn.Module):
    """E expert MLPs as 3-D weights; ``forward(x, counts)`` runs rows sorted by expert."""

    def __init__(self, n_experts: int, d_model: int, width: int, activation: str, bias: bool):
        super().__init__()
        self.n_experts, self.activation, self.kernel = n_experts, activation, "auto"
        self.w1 = nn.Parameter(torch.empty(n_experts, width, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, width))
        self.w3 = None
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(n_experts, width, d_model))
        self.b1 = self.b2 = None
        if bias:
            self.b1 = nn.Parameter(torch.empty(n_experts, width))
            self.b2 = nn.Parameter(torch.empty(n_experts, d_model))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Up (and gate) N(0, std), down N(0, out_std), biases 0 — as the dense MLP."""
        for w in (self.w1, self.w3):
            if w is not None:
                nn.init.normal_(w, 0.0, std)
        nn.init.normal_(self.w2, 0.0, out_std)
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def pick_kernel(self, x: torch.Tensor, counts: torch.Tensor) -> str:
        """``self.kernel``, or for 'auto' the fastest as measured at first use per shape
        (``x`` already in the compute dtype)."""
        if self.kernel != "auto":
            if self.kernel == "grouped":
                dims = [self.w1.shape[-1], self.w1.shape[-2]]
                if not grouped_mm_supported(x.device, x.dtype, dims):
                    raise RuntimeError(
                        f"torch._grouped_mm is not available for {x.device}/{x.dtype}."
                    )
            return self.kernel
        return choose_expert_kernel(x, counts, self.local_tensors(), self.activation)[0]

    def local_tensors(self) -> dict[str, torch.Tensor | None]:
        """The expert tensors this module computes with (local shards under expert parallel)."""
        return {name: getattr(self, name) for name in ("w1", "w2", "w3", "b1", "b2")}

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        t = self.local_tensors()
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            kernel = self.pick_kernel(x, counts)
            t = {k: None if v is None else v.to(dtype) for k, v in t.items()}
            return expert_mlp(x, counts, t, self.activation, kernel)


class Router(nn.Module):
    """Token-choice router: fp32 logits x Wᵀ, scores, and the balancing bias (a buffer)."""

    def __init__(self, d_model: int, n_experts: int, score: str):
        super().__init__()
        self.score = score
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("expert_bias", torch.empty(n_experts))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, logits), both [N, E] fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        return scores, logits


class MoE(nn.Module):
    """Router + grouped experts (+ an optional shared MLP) in place of a dense MLP."""

    def __init__(self, cfg, shared: nn.Module | None = None) -> None:
        super().__init__()
        m = cfg.moe
        self.moe = m
        self.router = Router(cfg.d_model, m.experts, m.router)
        self.experts = GroupedExperts(
            m.experts, cfg.d_model, expert_width(cfg), cfg.activation, cfg.bias
        )
        self.experts.kernel = m.kernel
        self.shared = shared
        self.shared_gate = None
        if shared is not None and m.shared_gate:
            self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None
        """Set by a training forward (balance + z-loss, scaled); taken by pop_aux_loss."""
        self.register_buffer("step_load", torch.empty(m.experts), persistent=False)
        self.register_buffer("step_dropped", torch.empty(()), persistent=False)
        self.last_losses = {"aux": 0.0, "z": 0.0}

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """The router N(0, std) and bias 0, experts and the shared MLP as the dense MLP, the
        shared gate N(0, std), load counters 0."""
        self.router.init_weights(std, out_std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, 0.0, std)
        self.reset_load()

    @torch.no_grad()
    def reset_load(self) -> None:
        """Zero the per-step routed-token and dropped counters."""
        self.step_load.zero_()
        self.step_dropped.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gates [N, k], choices [N, k], scores [N, E]) plus logits for the z-loss."""
        scores, logits = self.router(x)
        chooser = scores + self.router.expert_bias
        choice = chooser.topk(self.moe.top_k, dim=-1).indices
        gates = scores.gather(1, choice)
        if self.moe.normalize_top_k:
            gates = gates / gates.sum(-1, keepdim=True)
        return gates, choice, scores, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates, choice, scores, logits = self.route(x)
        cap = capacity(x.shape[0], self.moe.top_k, self.moe.experts, self.moe.capacity_factor)
        plan = dispatch(choice, self.moe.experts, cap)
        # cast before gathering (under autocast the k copies of each row move in bf16), and
        # index_select, not x[plan.token]: on CPU advanced indexing (and its backward,
        # index_put) is several times slower than index_select (and index_add)
        rows = x.to(compute_dtype(x)).index_select(0, plan.token)
        y = self.experts(rows, plan.counts)
        y = y * gates.t().reshape(-1).index_select(0, plan.slot)[:, None].to(y.dtype)
        out = y.new_zeros(x.shape[0], shape[-1]).index_add_(0, plan.token, y)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():
            self._record(plan, scores, logits)
        return out.reshape(shape)

    def _record(self, plan: Dispatch, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep this micro-batch's balancing losses (with graph) and its load (detached).

        Under activation checkpointing backward re-runs this forward: the losses are computed
        again (the recomputation must save the same tensors) but not kept a second time."""
        m, n_assign = self.moe, plan.routed.sum()
        loss = scores.new_zeros(())
        if m.aux_loss_coef:
            probs = scores if m.router == "softmax" else scores / scores.sum(-1, keepdim=True)
            balance = m.experts * (plan.routed.float() / n_assign * probs.mean(0)).sum()
            loss = loss + m.aux_loss_coef * balance
            self.last_losses["aux"] = balance.detach()
        if m.z_loss_coef:
            z = logits.logsumexp(-1).square().mean()
            loss = loss + m.z_loss_coef * z
            self.last_losses["z"] = z.detach()
        if torch._C._current_graph_task_id() != -1:  # inside backward: a recomputation
            return
        previous = self.aux_loss
        self.aux_loss = loss if previous is None else previous + loss
        with torch.no_grad():
            self.step_load += plan.routed.to(self.step_load.dtype)
            self.step_dropped += plan.dropped

    @torch.no_grad()
    def update_expert_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: bᵢ += γ·sign(mean load − loadᵢ)."""
        rate = self.moe.bias_update_rate
        if rate:
            load = load.to(self.router.expert_bias)
            self.router.expert_bias += rate * torch.sign(load.mean() - load)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE module of ``model`` in order (through wrappers)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the balancing losses the MoE layers recorded since the last call (then cleared);
    None for a dense model or when no training forward ran. Add it to the training loss."""
    total = None
    for layer in moe_layers(model):
        if layer.aux_loss is not None:
            total = layer.aux_loss if total is None else total + layer.aux_loss
            layer.aux_loss = None
    return total
