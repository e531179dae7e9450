"""Per-rank memory of the routed experts under expert parallelism, kept apart from
kiln.train.memory's dense accounting (which calls :func:`expert_terms` and
:meth:`ExpertTerms.add_to`).

The dense formulas divide a block's parameters by the tensor degree and shard them with the
block under FSDP2. Under expert parallelism (``parallel.expert`` = ep > 1, kiln.distributed.
expert_parallel) or tensor parallelism the routed experts live elsewhere, so memory.py leaves
them out of its blocks and this module counts them, with N_e the routed expert parameters of
all MoE layers, N_e,layer those of the largest MoE layer and edp = dp / ep the ranks holding the
same experts:

  parameters   4·N_e / ep, whole on every tensor rank (an MoE layer is not tensor-split);
               FSDP2 with dp > ep shards them over edp: 4·N_e / ep / edp, plus one gathered
               layer 4·N_e,layer / ep and, on CPU with the heap kept, the extra unsharded copy
               FSDP2 holds there (kiln.train.memory.FSDP_CPU_EXTRA); DDP and FSDP2 with dp = ep
               leave them whole (no DDP gradient bucket: DDP ignores them). What a kept heap
               holds beyond this is kiln.train.memory's HEAP_KEPT_TRANSIENT term, as for every
               layout (an earlier fitted excess of 0.75 local expert copies, from before that
               term, counted it twice: 2-rank EP2 runs measured 0.70–0.90 of that estimate)
  gradients    as the parameters
  optimizer    AdamW moments 8·N_e / ep / edp (or 8·N_e / ep when whole)
  opt. temps   the expert parameters are DTensors (sharded over ep), so AdamW takes its foreach
               path for the whole rank: one temporary copy of every local parameter, the dense
               ones included
  dispatch     per MoE layer and token of the micro-batch: the k rows received by the
               all-to-all, regrouped by local expert, which the grouped GEMM saves (one
               process saves the routed copy and the expert output; expert parallelism saves
               the returned rows' copy in the expert output's place, and the received rows in
               addition), k·d elements, and their int64 regrouping order, 8·k bytes (balanced
               routing: a rank receives about as many rows as it sends; measured against
               autograd's saved tensors in tests/unit/test_memory_moe.py); plus, while one layer
               dispatches, its send and receive buffers, 2·k·d elements per token once
  build        every rank builds the whole model (counted by memory.py), then copies out its
               1/ep of the experts while the whole model still exists: 4·N_e / ep.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.models.gpt import GPTConfig
from kiln.planning.moe import expert_width, n_moe_layers


def routed_expert_params(shape: GPTConfig) -> tuple[int, int]:
    """(all MoE layers', one MoE layer's) routed expert parameters: E experts of
    w1 [f_e, d], w2 [d, f_e] (and w3 [f_e, d] for SwiGLU), biases [f_e] and [d] with bias."""
    m = shape.moe
    if m is None or not m.experts:
        return 0, 0
    d, fe = shape.d_model, expert_width(shape)
    mats = 3 if shape.activation == "swiglu" else 2
    layer = m.experts * (mats * d * fe + (fe + d if shape.bias else 0))
    return n_moe_layers(shape) * layer, layer


@dataclass
class ExpertTerms:
    """What the experts add to one rank's estimate (bytes), and what memory.py leaves out of its
    blocks for them (``block_params``: parameters per block, the total spread over L)."""

    ep: int = 1
    block_params: int = 0
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    dispatch: int = 0
    build: int = 0
    dtensors: bool = False

    def add_to(self, est):
        """Add the expert terms to a MemoryEstimate of the dense rest (in place; returns it)."""
        if not (self.params or self.dispatch):
            return est
        est.params += self.params
        est.grads += self.grads
        est.optimizer += self.optimizer
        if self.dtensors or est.optimizer_temps:  # foreach AdamW: one temporary per local
            est.optimizer_temps = est.optimizer // 2  # parameter, the dense ones included
        est.activations += self.dispatch
        est.build += self.build
        if self.ep > 1:
            est.layout += f" ep{self.ep}"
        return est


def expert_terms(shape: GPTConfig, cfg, world_size: int, tokens: int, precision: str,
                 heap_kept: bool = False) -> ExpertTerms:  # fmt: skip
    """The experts' share of one rank's memory under the layout ``cfg`` (a ParallelConfig),
    ``tokens`` the tokens of one micro-batch; zero when memory.py's block accounting is right
    already (no experts, or neither expert nor tensor parallelism). ``heap_kept``: a CPU whose
    malloc keeps freed memory (kiln.train.memory decides it), which adds FSDP2's extra copy of
    the experts it shards, as kiln.train.memory does for the other parameters."""
    total, layer = routed_expert_params(shape)
    ep, tp = cfg.expert, cfg.tensor
    if not total or (ep == 1 and tp == 1):
        return ExpertTerms()
    dp = world_size // (tp * cfg.pipeline)
    fsdp = cfg.data == "fsdp"
    if ep > 1:
        shards = dp // ep if fsdp else 1  # edp; FSDP2 with dp = ep leaves them whole
    else:  # inside the blocks: FSDP2 shards them over dp_shard
        shards = dp // cfg.data_replicate if fsdp else 1
    local = -(-total // (ep * shards))
    gathered = 0
    if shards > 1:
        from kiln.train.memory import FSDP_CPU_EXTRA

        gathered = 4 * layer // ep + (FSDP_CPU_EXTRA * 4 * total // ep if heap_kept else 0)
    size = 2 if precision == "bf16" else 4
    k, d, n_moe = shape.moe.top_k, shape.d_model, n_moe_layers(shape)
    kept = n_moe * (k * d * size + 8 * k) + 2 * k * d * size  # + one layer's buffers
    dispatch = tokens * kept if ep > 1 else 0
    return ExpertTerms(
        ep=ep, block_params=-(-total // shape.n_layers), params=4 * local + gathered,
        grads=4 * local + gathered, optimizer=8 * local, dispatch=dispatch,
        build=4 * total // ep if ep > 1 else 0, dtensors=ep > 1,
    )  # fmt: skip


__all__ = ["ExpertTerms", "expert_terms", "routed_expert_params"]
