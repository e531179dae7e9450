"""Per-rank training memory from the shape alone: parameters, gradients, optimizer state,
activations — for DDP or FSDP2, with or without activation checkpointing, and for any layout
(TP/SP, PP stages and schedules, FSDP2/HSDP, DDP) in :func:`estimate_layout_memory`, which
`kiln estimate-memory` and the cluster planner (kiln.planning.layout) both call.

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
On a CPU with kiln's default malloc tuning (freed memory kept in the heap, kiln.train.malloc)
:func:`estimate_layout_memory` adds what that heap holds beyond the live tensors
(:data:`HEAP_KEPT_TRANSIENT` of the step's transient bytes, and :data:`FSDP_CPU_EXTRA`).
Process overhead (the CUDA context or the CPython/torch runtime) is not included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import lru_cache

import torch

from kiln.models.gpt import GPTConfig, uses_matmul_attention
from kiln.models.loss import chunk_rows
from kiln.planning.moe import expert_width, n_moe_layers
from kiln.planning.ops import block_params
from kiln.train.memory_experts import expert_terms


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
    build: int = 0
    """Transient while the model is built: this rank's shards plus one unit built whole."""
    in_flight: float = 1.0
    """Micro-batches of this rank's activations held at its peak (pipeline schedules)."""
    layout: str = ""
    """What the column is: e.g. 'fsdp×4', 'tp2 pp2 1F1B m4 fsdp×1 · pp rank 0'."""
    heap: int = 0
    """CPU, malloc keeping freed memory: what the kept heap holds beyond the live peak
    (:data:`HEAP_KEPT_TRANSIENT` × the step's transient bytes)."""

    @property
    def transient(self) -> int:
        """Bytes a step allocates and frees again: gradients plus the larger of activations
        and optimizer temporaries (parameters, optimizer state and DDP buckets stay)."""
        return self.grads + max(self.activations, self.optimizer_temps)

    @property
    def peak(self) -> int:
        """max(backward peak, optimizer-step peak) — see the module docstring — plus what a
        kept CPU heap holds beyond it."""
        resident = self.params + self.grad_buckets + self.optimizer
        return resident + self.transient + self.heap

    @property
    def peak_with_build(self) -> int:
        """The process's high-water mark: the training peak or the build transient."""
        return max(self.peak, self.build)

    def rows(self) -> list[tuple[str, int]]:
        rows = [
            ("parameters (fp32)", self.params),
            ("gradients (fp32)", self.grads),
            ("DDP gradient buckets", self.grad_buckets),
            ("optimizer state (AdamW)", self.optimizer),
            ("optimizer step temporaries", self.optimizer_temps),
            ("activations", self.activations),
        ]
        if self.heap:
            rows.append(("kept heap (CPU malloc)", self.heap))
        rows.append(("peak", self.peak))
        if self.build:
            rows += [("model build (transient)", self.build),
                     ("peak incl. build", self.peak_with_build)]  # fmt: skip
        return rows


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


LOSS_PARALLEL_TEMPS = 5
"""Vocabulary-sharded fp32 logit-sized tensors loss_parallel's cross entropy holds at once
beyond the two it keeps (the log-softmax's shifted and exponentiated copies, the gradients of
the log-softmax and of the logits): measured on this CPU, TP2 on 2 gloo ranks, the peak exceeds
the kept tensors by ~5 of them whatever the depth (tests/distributed/test_memory_estimate.py)."""


def head_transient_bytes(shape: GPTConfig, tokens: int, precision: str, tp: int = 1) -> int:
    """Bytes the loss holds only while it runs, once per rank however many micro-batches are
    in flight: the fused loss's two chunk buffers (compute dtype and fp32) of chunk_rows(V)
    tokens, or under TP loss_parallel's temporaries (LOSS_PARALLEL_TEMPS logit-sized fp32
    tensors of V / tp columns)."""
    V = shape.vocab_size
    if tp > 1:
        return int(LOSS_PARALLEL_TEMPS * tokens * V / tp * 4)
    size = 2 if precision == "bf16" else 4
    return min(chunk_rows(V), tokens) * V * (size + 4)


def activation_bytes(
    shape: GPTConfig,
    micro_batch: int,
    seq_len: int,
    precision: str,
    checkpointing: bool,
    device: str = "cpu",
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    embedding: bool = True,
    head: bool = True,
    transient: bool = True,
    recompute: bool = True,
) -> int:
    """Bytes autograd keeps for backward on one rank (see the module docstring) for one
    micro-batch through ``shape.n_layers`` blocks, with or without the embedding and the head
    (a pipeline stage). Under tensor parallelism (``tp`` > 1) q, k, v, the attention output
    and the MLP's hidden units are split over the ranks; the norms' inputs and outputs are
    whole, or with sequence parallelism the inputs are split along the sequence while the
    outputs, all-gathered for the column-wise matmuls that save them, stay whole. The head
    keeps the vocabulary-sharded fp32 logits and their log-softmax (loss_parallel), plus, with
    ``transient``, what the loss holds only while it runs (:func:`head_transient_bytes`). With
    activation checkpointing, ``recompute`` adds the one block's full activations that exist
    only while that block is recomputed for its backward: once per rank, however many
    micro-batches a pipeline keeps in flight (their blocks' inputs are what stays)."""
    d, f, L, V = shape.d_model, shape.d_ffn, shape.n_layers, shape.vocab_size
    q, kv = shape.n_heads * shape.d_head, shape.n_kv_heads * shape.d_head
    up = 3 * f if shape.activation == "swiglu" else 2 * f
    norms = 2 * d / tp + 2 * d if sequence_parallel and tp > 1 else 4 * d
    per_token_layer = norms + (q + 2 * kv + 2 * q + up) / tp  # elements
    size = 2 if precision == "bf16" else 4
    layer_bytes = per_token_layer * size + (2 * d * 4 if precision == "bf16" else 0)
    tokens = micro_batch * seq_len
    stream = d / tp if sequence_parallel and tp > 1 else d  # the residual stream per token
    per_token = stream * 4 if embedding else 0
    chunk = head_transient_bytes(shape, tokens, precision, tp) if head and transient else 0
    if head and tp > 1:  # loss_parallel: gathered input, fp32 logits and log-softmax
        per_token += stream * 4 + d * size + 2 * V / tp * 4
    elif head:
        per_token += d * 4 + (d + V) * size
    probs = 0  # per layer, not per token
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if uses_matmul_attention(device, dtype, seq_len, gqa=shape.n_kv_heads != shape.n_heads):
        probs = micro_batch * shape.n_heads // tp * seq_len**2 * 2
    n_moe = n_moe_layers(shape)  # their routed experts keep other tensors than the MLP's
    moe_extra = moe_layer_bytes(shape, size) - up / tp * size if n_moe else 0  # MoE: whole
    if checkpointing and L:
        body = tokens * L * stream * 4
        body += tokens * (layer_bytes + max(moe_extra, 0)) + probs if recompute else 0
    else:
        body = L * (tokens * layer_bytes + probs) + n_moe * tokens * moe_extra
    return int(tokens * per_token + body + chunk)


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


FSDP_CPU_EXTRA = 1
"""FSDP2 on CPU (gloo, CPU offload) with malloc keeping freed memory (kiln.train.malloc, the
default): the measured peak exceeds the sharded accounting by about one more unsharded copy of
the rank's parameters, as parameters and as gradients (fit to 2-rank runs on this CPU). It is
heap fragmentation: FSDP2 frees and re-allocates every block's gathered parameters and gradients
each step, and the kept heap does not fit the new blocks into the old holes. With
``KILN_MALLOC_TUNING=memory`` (``heap_kept=False``) the term goes away."""


HEAP_KEPT_TRANSIENT = 0.4
"""CPU with malloc keeping freed memory (kiln.train.malloc's default: no mmap, heap never
trimmed): the resident set exceeds the live peak by about this fraction of the step's transient
bytes (:attr:`MemoryEstimate.transient`: gradients, activations or optimizer temporaries). A
kept heap reuses a freed block only for a request that fits in it; every step frees and
re-allocates its transient tensors in another order, around blocks that outlive them (the
optimizer state created at the first step, gloo's and autograd's small buffers), so part of
the holes are in the wrong place for the next step's blocks and the heap grows past the live
peak. Measured against the same runs with ``KILN_MALLOC_TUNING=memory`` (the resident set
follows the live tensors): without FSDP2 the excess is 0.1-1.2x the transient bytes, settled
by step 8, depending on how far from stack order the step frees (GPipe least; 1F1B, TP most);
FSDP2's further excess is :data:`FSDP_CPU_EXTRA`. 0.4 is fitted on DDP×2, TP2 and PP2 1F1B
(0.22, 0.61, 0.96; benchmarks/planner_measured.py, docs/planner.md) and held against the other
seven layouts there. Not on a GPU (the caching allocator) and not with
``KILN_MALLOC_TUNING=memory`` (``heap_kept=False``)."""


@lru_cache(maxsize=256)
def pipeline_order(schedule: str, pp: int, per_rank: int, microbatches: int) -> dict:
    """pp rank → its compute actions in order, as ``(kind, stage, micro-batch)`` with kind F
    (forward), B (full backward), I (input backward) or W (weight backward): the order torch's
    own schedule class computes (its ``pipeline_order``), so the count of micro-batches in
    flight is the schedule's, not a formula's. Built with stand-in stages (no process group)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

    from kiln.distributed.pipeline import stage_ids

    cls = get_schedule_class(schedule)
    multi = issubclass(cls, PipelineScheduleMulti)
    ids = stage_ids(schedule, 0, pp, per_rank)
    stages = [SimpleNamespace(num_stages=pp * per_rank, group_size=pp, group_rank=0,
                              stage_index=i, is_first=i == 0, is_last=i == pp * per_rank - 1,
                              submod=torch.nn.Module()) for i in ids]  # fmt: skip
    order = cls(stages if multi else stages[0], n_microbatches=microbatches).pipeline_order
    out = {}
    for rank, actions in order.items():
        flat = []
        for a in actions:
            for sub in (a.sub_actions or (a,)) if a is not None else ():
                kind = str(sub.computation_type)
                kind = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I",
                        "BACKWARD_WEIGHT": "W"}.get(kind.split(".")[-1], kind)  # fmt: skip
                if kind in ("F", "B", "I", "W"):
                    flat.append((kind, sub.stage_index, sub.microbatch_index))
        out[rank] = flat
    return out


def in_flight_peak(actions: list, stage_bytes: dict[int, int]) -> tuple[int, float]:
    """(bytes, micro-batches) of activations one rank holds at its peak: a stage's forward
    keeps its micro-batch's activations until its full backward (B) or, for the zero-bubble
    schedules, its weight backward (W: torch's input backward keeps the graph for it)."""
    live = dict.fromkeys(stage_bytes, 0)
    best, count = 0, 0.0
    for kind, stage, _ in actions:
        live[stage] += 1 if kind == "F" else -1 if kind in ("B", "W") else 0
        held = sum(n * stage_bytes[s] for s, n in live.items())
        if held > best:
            best, count = held, sum(live.values()) / len(live)
    return best, count


def estimate_layout_memory(
    shape: GPTConfig,
    seq_len: int,
    local_batch: int,
    precision: str = "fp32",
    world_size: int = 1,
    parallel=None,
    micro_batch: int | None = None,
    device: str = "cpu",
    heap_kept: bool | None = None,
) -> list[MemoryEstimate]:
    """Per-rank memory of training ``shape`` under a layout (a ParallelConfig: tensor,
    pipeline, data_replicate, data, schedule, micro-batches, activation checkpointing), one
    estimate per pipeline rank (the tensor and data-parallel ranks of a stage are alike).
    ``local_batch``: sequences each data-parallel rank gets per step; ``micro_batch``: the
    trainer's micro-batch without a pipeline (None = the local batch); ``heap_kept``: malloc
    keeps freed memory (kiln.train.malloc's default; False for ``KILN_MALLOC_TUNING=memory``;
    None: what this process's KILN_MALLOC_TUNING says, :func:`kiln.train.malloc.heap_is_kept`),
    which on a CPU adds :data:`FSDP_CPU_EXTRA` and :data:`HEAP_KEPT_TRANSIENT`. See the module
    docstring for the formulas; this function splits them by layout:

    - stage: a rank holds the blocks of its pipeline stage(s) (kiln.distributed.pipeline's
      split, the embedding and head weighed as layers), N_rank parameters;
    - tensor parallel divides the stage's parameters, gradients and optimizer state by tp,
      and its activations as :func:`activation_bytes` says;
    - FSDP2 divides them again by dp_shard and adds one gathered block plus the root module
      (embedding, final norm, head: gathered for the whole forward and backward), as
      parameters and as unsharded gradients; DDP adds its gradient buckets (4·N_rank);
    - activations: each stage's activations for one micro-batch (local_batch / m sequences)
      times the micro-batches the schedule keeps in flight (:func:`pipeline_order`): GPipe
      all m, 1F1B pp − rank, interleaved and zero-bubble what their order says; with
      activation checkpointing a micro-batch in flight keeps only its blocks' inputs, and the
      block being recomputed adds its full activations once per rank (counting them per
      micro-batch in flight put the 530B and 1T published layouts at 82 and 129 GB);
    - build: the model is built on the meta device and sharded there; each rank allocates its
      own parameters and fills them one initialisation unit at a time (an embedding, a block,
      the head: built whole from the seed, so every layout starts from the same weights), so
      the build holds 4·(N_local + the largest unit) (kiln.distributed.materialize).
    """
    from kiln.config import ParallelConfig
    from kiln.distributed.pipeline import stage_ids, stage_layers, stages_per_rank
    from kiln.planning.ops import StepShape, embedding_ops
    from kiln.train.malloc import heap_is_kept

    shape = _as_gpt_config(shape)
    cfg = parallel or ParallelConfig()
    kept = device == "cpu" and (heap_is_kept() if heap_kept is None else heap_kept)
    tp, pp, rep = cfg.tensor, cfg.pipeline, cfg.data_replicate
    shard = world_size // (tp * pp * rep)
    dp = rep * shard
    fsdp = cfg.data == "fsdp" and shard > 1
    ddp = cfg.data == "ddp" and dp > 1
    sp = cfg.sequence_parallel and tp > 1 and pp == 1  # kiln turns SP off under PP
    ac = cfg.activation_checkpointing
    n, nb = shape.num_params(include_embeddings=True), _block_params(shape)
    ne = sum(o.params * o.count for o in embedding_ops(shape, StepShape(batch=1, seq_len=1)))
    nh = n - ne - shape.n_layers * nb  # final norm + untied head
    v = stages_per_rank(cfg.pipeline_schedule, cfg.stages_per_rank) if pp > 1 else 1
    stages, m = pp * v, (cfg.microbatches or pp * v) if pp > 1 else 1
    mb = local_batch // m if pp > 1 else micro_batch or local_batch
    experts = expert_terms(shape, cfg, world_size, mb * seq_len, precision, kept)
    nb -= experts.block_params  # counted apart when split over ep or kept whole under tp
    order = pipeline_order(cfg.pipeline_schedule, pp, v, m) if pp > 1 else {0: []}
    out = []
    for rank in range(pp):
        ids = stage_ids(cfg.pipeline_schedule, rank, pp, v) if pp > 1 else [0]
        layers = {s: len(stage_layers(shape.n_layers, stages, s)) for s in ids}
        first, last = 0 in ids, stages - 1 in ids
        n_rank = sum(layers.values()) * nb + first * ne + last * nh
        root = first * ne + last * nh
        local = -(-n_rank // (tp * shard)) if fsdp else -(-n_rank // tp)
        gathered = 4 * (nb + root) // tp if fsdp else 0
        stage_acts = {s: functools.partial(
            activation_bytes, shape.replace(n_layers=k), mb, seq_len, precision, ac, device,
            tp=tp, sequence_parallel=sp, embedding=s == 0, head=s == stages - 1,
            transient=False) for s, k in layers.items()}  # fmt: skip
        acts = {s: f(recompute=False) for s, f in stage_acts.items()}
        act, held = in_flight_peak(order[rank], acts) if pp > 1 else (acts[0], 1.0)
        act += head_transient_bytes(shape, mb * seq_len, precision, tp) if last else 0
        act += max(f() - acts[s] for s, f in stage_acts.items())  # AC: one block recomputed
        extra = FSDP_CPU_EXTRA * 4 * (sum(layers.values()) * nb + root) // tp if fsdp else 0
        gathered += extra if kept else 0
        unit = max(nb, shape.vocab_size * shape.d_model)  # the largest unit built whole
        name = _layout_name(cfg, world_size, shard, m, v)
        out.append(MemoryEstimate(
            params=4 * local + gathered, grads=4 * local + gathered,
            grad_buckets=4 * local if ddp else 0, optimizer=8 * local,
            optimizer_temps=4 * local if fsdp or tp > 1 else 0, activations=act,
            world_size=world_size, data=cfg.data if dp > 1 else "1 process",
            activation_checkpointing=ac, build=4 * (local + unit),
            in_flight=held, layout=name + (f" · pp rank {rank}" if pp > 1 else ""),
        ))  # fmt: skip
        experts.add_to(out[-1])
        if kept:  # the live transient, without FSDP's fragmentation term
            out[-1].heap = int(HEAP_KEPT_TRANSIENT * (out[-1].transient - extra))
    return out


def _as_gpt_config(shape) -> GPTConfig:
    """A GPTConfig with every size resolved (the planner passes kiln.planning.flops.Shape)."""
    if isinstance(shape, GPTConfig):
        return shape
    from kiln.planning.ops import dims

    z = dims(shape)
    return GPTConfig(n_layers=z["L"], d_model=z["d"], n_heads=z["h"], n_kv_heads=z["kv"] // z["dh"],
                     d_head=z["dh"], d_ffn=z["f"], vocab_size=z["V"], max_seq_len=z["S"],
                     position="learned" if z["learned_pos"] else "rope", norm=z["norm"],
                     activation=z["act"], bias=z["bias"], tie_embeddings=z["tied"])  # fmt: skip


def _layout_name(cfg, world: int, shard: int, m: int, v: int) -> str:
    parts = [f"tp{cfg.tensor}"] if cfg.tensor > 1 else []
    if cfg.pipeline > 1:
        parts.append(f"pp{cfg.pipeline} {cfg.pipeline_schedule}{f' v{v}' if v > 1 else ''} m{m}")
    dp = cfg.data_replicate * shard
    if dp > 1:
        hsdp = cfg.data == "fsdp" and cfg.data_replicate > 1 and shard > 1
        parts.append(f"hsdp{cfg.data_replicate}×{shard}" if hsdp else f"{cfg.data}×{dp}")
    name = " ".join(parts) or "1 process"
    return name + (" +AC" if cfg.activation_checkpointing else "")
