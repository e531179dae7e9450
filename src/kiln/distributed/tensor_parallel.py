"""Tensor (Megatron-style) and sequence parallelism, applied to the plain GPT from outside with
DTensor's ``parallelize_module``.

Per block (the parameter names are the plan's keys)::

    attn.wq / wk / wv, mlp.w1 / w3   ColwiseParallel   weight Shard(0): each rank holds whole heads
                                                       and a slice of the MLP's hidden units
    attn.wo, mlp.w2                  RowwiseParallel   weight Shard(1); the partial sums meet in an
                                                       all-reduce (TP) or a reduce-scatter along the
                                                       sequence (TP + SP)
    attn_norm, mlp_norm (SP only)    SequenceParallel  norms and the residual stream hold T / tp
                                                       tokens per rank
    attn.q_norm / k_norm             SequenceParallel  qk_norm 'head': each rank normalises its
                      (sequence_dim=2)                 own heads (dim 2 of [B, T, heads, d_head]);
                                                       the weight's gradient is summed over ranks

An MoE layer (kiln.models.moe) is not split: its input is whole on every rank of the group, so
each runs the same routing and experts on the same tokens (the experts split over the ``ep``
ranks instead, each tensor-parallel rank exchanging tokens with the ``ep`` ranks of its own
tensor coordinate) and gets the same gradients. Under sequence parallelism the layer's input is
all-gathered along the sequence first (as the dense MLP's column-wise input is) and each rank
keeps its own T / tp tokens of the output (a slice: no reduce-scatter, the outputs are equal).

The token embedding is sharded by vocabulary rows (RowwiseParallel; a vocabulary no degree divides,
e.g. GPT-2's 50257, is split unevenly), and so is an untied head. The head never gathers its
logits: :class:`LossParallelHead` multiplies the (gathered) hidden states by the vocabulary-sharded
weight and takes the cross entropy under ``loss_parallel`` — the chunked fused loss of
kiln.models.loss works on plain tensors only. Works for the GPT-3 style (LayerNorm, GELU, learned
positions, biases, tied embeddings) and the Llama style (RMSNorm, SwiGLU, RoPE, GQA/MQA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from kiln.errors import ConfigError


def check_tensor_parallel(shape, tp: int) -> None:
    """Refuse, before any work, a degree that cannot shard this shape (whole heads per rank)."""
    if tp == 1:
        return
    if getattr(shape, "qk_norm", "none") == "full":
        raise ConfigError(
            f"model.qk_norm 'full' (OLMoE) normalises q and k across all heads, which "
            f"parallel.tensor {tp} splits over ranks; use parallel.tensor 1 or qk_norm 'head'."
        )
    for name in ("n_heads", "n_kv_heads", "d_ffn"):
        value = getattr(shape, name)
        if value % tp:
            raise ConfigError(
                f"parallel.tensor {tp} does not divide model.{name} {value}; choose a tensor "
                f"degree that divides n_heads {shape.n_heads}, n_kv_heads {shape.n_kv_heads} "
                f"and d_ffn {shape.d_ffn}."
            )


def block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, object]:
    """The TP (+ SP) plan of one block, keyed by its parameter names."""
    seq = Shard(1) if sequence_parallel else Replicate()
    colwise = ColwiseParallel(input_layouts=seq)
    plan: dict[str, object] = {
        "attn.wq": colwise,
        "attn.wk": colwise,
        "attn.wv": colwise,
        "attn.wo": RowwiseParallel(output_layouts=seq),
    }
    if hasattr(block.mlp, "w1"):  # dense; an MoE layer runs whole on every rank (see below)
        plan["mlp.w1"] = colwise
        plan["mlp.w2"] = RowwiseParallel(output_layouts=seq)
    elif sequence_parallel:  # MoE under SP: gather the sequence in, keep this rank's part out
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
        )  # fmt: skip
    if hasattr(block.mlp, "w3"):
        plan["mlp.w3"] = colwise
    if getattr(block.attn, "q_norm", None) is not None:  # qk_norm 'head' ('full' is refused)
        heads = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attn.q_norm"] = plan["attn.k_norm"] = heads
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel()
        if hasattr(block, "mlp_norm"):
            plan["mlp_norm"] = SequenceParallel()
    return plan


def apply_tensor_parallel(
    model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool, log: Callable[[str], None]
) -> None:
    """Shard ``model`` (a GPT or a pipeline stage of one) over the ``tp`` mesh in place."""
    if model.tok_emb is not None:
        # vocabulary-sharded embedding; its output is whole (learned positions add to it)
        rows = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        parallelize_module(model.tok_emb, mesh, rows)
    if model.head is not None:  # only sharded by vocabulary: LossParallelHead uses the weight
        parallelize_module(model.head, mesh, ColwiseParallel(output_layouts=Shard(-1)))
    for block in model.blocks.values():
        parallelize_module(block, mesh, block_plan(block, sequence_parallel))
    if sequence_parallel:
        if model.tok_emb is not None and len(model.blocks):  # the stream is split from here on
            first = next(iter(model.blocks.values()))
            split = PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None),
                desired_input_layouts=(Shard(1), None, None, None),
                use_local_output=True,
            )
            parallelize_module(first, mesh, split)
        if model.norm is not None:
            parallelize_module(model.norm, mesh, SequenceParallel())
    log(
        f"tensor parallel: {mesh.size()} ranks (column/row-wise blocks, vocabulary-parallel "
        f"embedding{', sequence parallel' if sequence_parallel else ''}, loss parallel head)"
    )


class LossParallelHead:
    """The loss component under TP: final-normed hidden states (sequence-sharded under SP) →
    logits sharded by vocabulary → cross entropy under ``loss_parallel``, which never gathers
    the logits. The backward must run inside :meth:`context` too (the trainer does that)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh

    @staticmethod
    def context():
        return loss_parallel()

    def __call__(
        self, model: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
    ) -> torch.Tensor:
        if not isinstance(h, DTensor):
            h = DTensor.from_local(h, self.mesh, [Replicate()], run_check=False)
        h = h.redistribute(self.mesh, [Replicate()])
        logits = F.linear(h, model.head_weight)  # Shard(-1): this rank's vocabulary rows
        if model.config.output_multiplier != 1.0:
            logits = logits * model.config.output_multiplier
        logits = logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss
