"""Expert parallelism: each MoE layer's experts split over the ranks of an ``ep`` process group.

Applied from outside the plain model (kiln.models.moe is untouched): :func:`apply_expert_parallel`
replaces every layer's :class:`GroupedExperts` by a :class:`ShardedExperts` holding experts
``[r·E/P, (r+1)·E/P)`` of rank r, under the same parameter names (``mlp.experts.w1`` ...), as
DTensors sharded on dim 0 over the ``ep`` mesh: the checkpoint (DCP) then stores the full
``[E, ...]`` tensors and reloads them under any expert-parallel degree, optimizer state
included. The MoE layer still routes its own tokens and sorts them by global expert; the
sharded experts then

1. exchange the per-expert counts (``all_to_all_single``, E/P numbers to each rank),
2. send each rank the rows of its experts (``all_to_all_single`` with uneven splits, autograd:
   its backward is the reverse all-to-all; the rows are already in the compute dtype, so bf16
   under autocast),
3. regroup the received rows by local expert (source ranks in order within each), run the
   local grouped GEMM, undo the regrouping, and
4. send every row back to the rank it came from (the reverse all-to-all).

Every rank makes the same collectives in the same order whatever it routed, so a rank that
sends or receives no tokens takes part with zero-length splits instead of hanging.

The group is an argument (a ProcessGroup or a 1-D DeviceMesh); ``kiln train`` passes the
mesh's ``ep`` axis (:class:`kiln.distributed.parallel_dims.ParallelDims`), leaves the experts out
of the dense FSDP2/DDP and calls :class:`ExpertGrads` after each step's backward. With FSDP2 and
more data-parallel ranks than ``ep`` (dp = edp · ep), each layer's experts are FSDP2-sharded
over ``edp``, the ranks that would otherwise each hold a whole copy of the same experts
(:func:`shard_experts_over_replicas`, as torchtitan does); under DDP they stay replicated.

Gradients: the ep ranks are data-parallel ranks, each holding a different slice of the global
batch, so dense parameters are averaged over the data-parallel ranks as usual (DDP/FSDP), while
an expert's gradient already sums the contributions of all ep ranks' tokens through the reverse
all-to-all: :func:`finish_expert_grads` divides it by the data-parallel size (and sums over the
ranks holding the same experts when dp > ep; FSDP2 over ``edp`` has already averaged over them,
so that sum becomes a division by ``ep`` alone), so both equal the gradient of the mean loss
over the global batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single as all_to_all_autograd

from kiln.models.moe import GroupedExperts, moe_layers

EXPERT_TENSORS = ("w1", "w2", "w3", "b1", "b2")

# torch 2.13 deprecates the autograd all-to-all for a private successor; it still works, and
# every rank would otherwise print the warning at each layer's first dispatch.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_to_all_single is deprecated")


def _group(group_or_mesh) -> dist.ProcessGroup:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh."""
    if hasattr(group_or_mesh, "get_group"):
        return group_or_mesh.get_group()
    return group_or_mesh


def _mesh(group_or_mesh, device_type: str):
    """A 1-D DeviceMesh from a ProcessGroup or a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group_or_mesh, DeviceMesh):
        return group_or_mesh
    return DeviceMesh.from_group(group_or_mesh, device_type=device_type)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Uneven all-to-all of rows, differentiable (backward = the reverse all-to-all)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    return all_to_all_autograd(out, x.contiguous(), out_splits, in_splits, group=group)


class ShardedExperts(GroupedExperts):
    """This rank's E/P experts; ``forward`` takes all local tokens sorted by global expert."""

    def __init__(self, full: GroupedExperts, group) -> None:
        from torch.distributed.tensor import DTensor, Shard

        nn.Module.__init__(self)
        self.group = _group(group)
        mesh = _mesh(group, full.w1.device.type)
        self.ep_size = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        self.global_experts = full.n_experts
        self.n_experts = full.n_experts // self.ep_size
        self.activation, self.kernel = full.activation, full.kernel
        first = rank * self.n_experts
        for name in EXPERT_TENSORS:
            t = getattr(full, name)
            if t is not None:
                local = t.detach()[first : first + self.n_experts].clone()
                t = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
            setattr(self, name, t)
        self.first_expert = first

    def local_tensors(self) -> dict[str, torch.Tensor | None]:
        """This rank's experts as plain tensors (gradients flow back into the DTensors)."""
        return {
            name: None if t is None else t.to_local() for name, t in super().local_tensors().items()
        }

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        P, n = self.ep_size, self.n_experts
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        send_splits = counts.view(P, n).sum(1).tolist()
        recv_splits = recv.view(P, n).sum(1).tolist()
        rows = _exchange(x, recv_splits, send_splits, self.group)
        # rows arrive by source rank, then by local expert: regroup by local expert
        local_expert = torch.repeat_interleave(
            torch.arange(n, device=x.device).repeat(P), recv, output_size=rows.shape[0]
        )
        order = torch.argsort(local_expert, stable=True)
        y = super().forward(rows.index_select(0, order), recv.view(P, n).sum(0))
        back = torch.empty_like(y).index_copy(0, order, y)
        # the autograd all-to-all returns a view of its output buffer; FSDP2 (experts sharded
        # over edp) warns on a module returning a view, since an in-place op on it would skip
        # its backward hook: a copy of the rows (cheap next to the expert GEMMs) rules that out
        return _exchange(back, send_splits, recv_splits, self.group).clone()


def apply_expert_parallel(model: nn.Module, group, log=print) -> int:
    """Shard the experts of every MoE layer of ``model`` over ``group``; returns the layers.

    Call on an initialised model (every rank holding the same full weights, e.g. the same
    seed) before wrapping it for data parallelism."""
    size = dist.get_world_size(_group(group))
    layers = moe_layers(model)
    for layer in layers:
        if layer.experts.n_experts % size:
            from kiln.errors import ConfigError

            raise ConfigError(
                f"moe.experts {layer.experts.n_experts} is not divisible by the expert-parallel "
                f"degree {size}; choose a degree that divides {layer.experts.n_experts}."
            )
        layer.experts = ShardedExperts(layer.experts, group)
    log(f"expert parallel: {len(layers)} MoE layers, experts split over {size} ranks")
    return len(layers)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters (to keep out of data-parallel gradient averaging)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, ShardedExperts)
        for p in m.parameters(recurse=False)
    ]


def data_parallel_ignores(model: nn.Module) -> tuple[set[nn.Parameter], list[str]]:
    """The sharded expert parameters, and their names, that data parallelism (FSDP2/DDP) must
    leave alone: :func:`finish_expert_grads` averages their gradients instead."""
    params = set(expert_parameters(model))
    return params, [n for n, p in model.named_parameters() if p in params]


def shard_experts_over_replicas(model: nn.Module, mesh, log=print, **fsdp_kwargs) -> None:
    """FSDP2 on each MoE layer's (already expert-parallel) experts over ``mesh``, the ``edp``
    ranks holding the same experts: each keeps 1/edp of them (dim 0, then dim 1 when
    there are fewer local experts than edp ranks) and all-gathers them for its forward and
    backward; their gradients are reduce-scattered (averaged) over ``edp``. Call before the
    blocks are sharded (the blocks' FSDP2 then leaves the experts to this one)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    layers = moe_layers(model)
    for layer in layers:
        local = layer.experts.n_experts
        dim = 0 if local % mesh.size() == 0 else 1
        fully_shard(layer.experts, mesh=mesh, shard_placement_fn=lambda _, d=dim: Shard(d),
                    **fsdp_kwargs)  # fmt: skip
    log(f"FSDP2: experts of {len(layers)} MoE layers sharded over {mesh.size()} replicas (edp)")


class ExpertGrads:
    """Called once per step after the last backward (before clipping): finishes the expert
    gradients over the mesh's ``edp`` ranks (those holding the same experts); ``sharded``:
    FSDP2 shards the experts over ``edp`` and has averaged their gradients there already."""

    def __init__(self, model: nn.Module, dims, sharded: bool = False) -> None:
        self.model, self.dp_size = model, dims.dp_size
        self.replicas = dims.group("edp") if dims.dp_size > dims.ep and not sharded else None
        if sharded and dims.dp_size > dims.ep:
            self.dp_size = dims.ep  # (1/edp)·Σ from FSDP2, then 1/ep: together 1/dp

    def __call__(self) -> None:
        finish_expert_grads(self.model, self.dp_size, self.replicas)


@torch.no_grad()
def finish_expert_grads(model: nn.Module, dp_size: int, replica_group=None) -> None:
    """Turn summed expert gradients into the gradient of the global-batch mean loss: sum over
    ``replica_group`` (ranks holding the same experts, when dp > ep), divide by ``dp_size``."""
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        grad = p.grad.to_local()
        if replica_group is not None:
            dist.all_reduce(grad, group=_group(replica_group))
        grad.div_(dp_size)
