"""Pipeline parallelism with ``torch.distributed.pipelining``: the plain GPT is cut into stages by
its module names, and a schedule (GPipe, 1F1B, interleaved, zero-bubble, DualPipeV) runs the
micro-batches through them.

Cutting: the embedding and the head each weigh as one layer, so the ``L + 2`` units are split
into ``S`` contiguous runs of ``⌊s·(L+2)/S⌋ …`` units (an uneven split is fine). ``kiln train``
cuts the model on the meta device and each rank allocates only its stages, initialised to the
values one process gives them (kiln.distributed.materialize); blocks are a ModuleDict keyed by
their global index, so parameter names — and so checkpoints — are the same under every layout. A
rank holds one stage, or two for the multi-stage schedules: looping (stage r and r + pp) for
Interleaved1F1B / InterleavedZeroBubble / LoopedBFS, a V (stage r and 2·pp − 1 − r) for
ZBVZeroBubble and DualPipeV.

Loss: each micro-batch's loss is its mean cross entropy × (its tokens / this rank's tokens), and
the schedule sums the micro-batches without rescaling (``scale_grads=False``): the sum over
micro-batches is the mean over the batch, scaled exactly once. Tied embeddings are refused (the
first and last stage would share one matrix).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from kiln.config import PIPELINE_SCHEDULES
from kiln.errors import ConfigError

SCHEDULES = PIPELINE_SCHEDULES
MULTI_STAGE = {"Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
               "DualPipeV"}  # fmt: skip
V_SHAPED = {"ZBVZeroBubble", "DualPipeV"}


def stages_per_rank(schedule: str, requested: int | None) -> int:
    """Stages one rank holds: as requested, else 2 for the multi-stage schedules, else 1."""
    if requested is not None:
        return requested
    return 2 if schedule in MULTI_STAGE else 1


def check_pipeline(shape, pp: int, schedule: str, microbatches: int | None,
                   per_rank: int | None) -> None:  # fmt: skip
    """Refuse, before any work, a pipeline layout that cannot run (one sentence each)."""
    if pp == 1:
        return
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"parallel.pipeline_schedule is {schedule!r}; choose one of {', '.join(SCHEDULES)}."
        )
    v = stages_per_rank(schedule, per_rank)
    if schedule in V_SHAPED and v != 2:
        raise ConfigError(
            f"parallel.pipeline_schedule {schedule} places two stages per rank in a V but "
            f"parallel.stages_per_rank is {v}; set it to 2 or leave it unset."
        )
    if schedule not in MULTI_STAGE and v != 1:
        raise ConfigError(
            f"parallel.pipeline_schedule {schedule} runs one stage per rank but "
            f"parallel.stages_per_rank is {v}; use Interleaved1F1B or leave it unset."
        )
    stages = pp * v
    if stages > shape.n_layers:
        raise ConfigError(
            f"{stages} pipeline stages (parallel.pipeline {pp} × {v} per rank) exceed "
            f"model.n_layers {shape.n_layers}; use at most {shape.n_layers} stages."
        )
    n_micro = microbatches or stages
    if n_micro < stages:
        raise ConfigError(
            f"parallel.microbatches is {n_micro} but the pipeline has {stages} stages; use at "
            f"least {stages} micro-batches."
        )
    if shape.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings is true but with parallel.pipeline > 1 the embedding and the "
            "head live on different stages; set --model.tie_embeddings false."
        )


def stage_ids(schedule: str, pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The global stage indices this rank holds."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


def stage_layers(n_layers: int, n_stages: int, stage: int) -> list[str]:
    """Block names of ``stage``: the L + 2 units (embedding, blocks, head) split evenly."""
    units = n_layers + 2
    lo, hi = stage * units // n_stages, (stage + 1) * units // n_stages
    return [str(u - 1) for u in range(lo, hi) if 1 <= u <= n_layers]


def cut_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """A copy of ``model`` holding only ``stage``'s modules (names unchanged)."""
    part = copy.deepcopy(model)
    keep = set(stage_layers(model.config.n_layers, n_stages, stage))
    for name in list(part.blocks):
        if name not in keep:
            del part.blocks[name]
    if stage > 0:
        part.tok_emb = part.pos_emb = None
    if stage < n_stages - 1:
        part.norm = part.head = None
    else:
        part.output_hidden = True  # the loss component applies the head
    return part


class Pipeline:
    """This rank's stages and the schedule that drives them; ``step`` runs forward and backward
    of one (local) batch and returns its mean loss (0 on ranks without the last stage)."""

    def __init__(self, parts: list[nn.Module], modules: list[nn.Module], ids: list[int],
                 n_stages: int, schedule: str,
                 microbatches: int, group, device: torch.device, loss) -> None:  # fmt: skip
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        self.parts, self.ids, self.n_stages, self.group = parts, ids, n_stages, group
        self.has_first, self.has_last = 0 in ids, n_stages - 1 in ids
        self.last = parts[ids.index(n_stages - 1)] if self.has_last else None
        self.loss, self.tokens, self.microbatches = loss, 1, microbatches
        self.v_shaped, self.d_model = schedule in V_SHAPED, parts[0].config.d_model
        self.modules = modules  # what runs: the parts, or DDP wrappers around them
        stages = [PipelineStage(m, i, n_stages, device, group=group) for m, i in zip(modules, ids)]
        cls = get_schedule_class(schedule)
        first = stages if schedule in MULTI_STAGE else stages[0]
        self.schedule = cls(first, n_microbatches=microbatches, loss_fn=self._loss,
                            scale_grads=False)  # fmt: skip

    def _loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.last, h, y) * (y.numel() / self.tokens)

    def _run(self, run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.tokens = y.numel()
        losses: list[torch.Tensor] = []
        args = (x,) if self.has_first else ()
        target = y if self.has_last else None
        run(*args, target=target, losses=losses)
        total = torch.stack([t.detach().float() for t in losses]).sum() if losses else None
        total = total if total is not None else torch.zeros((), device=x.device)
        dist.all_reduce(total, group=self.group)  # only the last stage's rank adds a loss
        return total

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(self.schedule.step, x, y)

    def owner(self, stage: int) -> int:
        """The pp-group rank holding ``stage`` (a V, or a loop)."""
        pp = dist.get_world_size(self.group)
        if self.v_shaped:
            return stage if stage < pp else self.n_stages - 1 - stage
        return stage % pp

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of a whole batch, forward only, stage after stage (the V schedules have
        no forward-only mode; validation is rare enough not to need overlap), one micro-batch
        at a time as in training: the whole batch at once held m micro-batches' logits on the
        last stage (measured: PP2 1F1B m4's last rank peaked ~100 MiB above its training
        peak in the final validation)."""
        me = dist.get_rank(self.group)
        total = torch.zeros((), device=x.device)
        for xb, yb in zip(x.tensor_split(self.microbatches), y.tensor_split(self.microbatches)):
            h = xb
            for stage in range(self.n_stages):
                if self.owner(stage) != me:
                    continue
                if stage > 0 and self.owner(stage - 1) != me:
                    h = torch.empty(*xb.shape, self.d_model, device=x.device)
                    dist.recv(h, group=self.group, group_src=self.owner(stage - 1))
                h = self.modules[self.ids.index(stage)](h)
                if stage == self.n_stages - 1:
                    total += self.loss(self.last, h, yb).float() * (yb.numel() / y.numel())
                elif self.owner(stage + 1) != me:
                    dst = self.owner(stage + 1)
                    dist.send(h.float().contiguous(), group=self.group, group_dst=dst)
        dist.all_reduce(total, group=self.group)
        return total


def cut_stages(model: nn.Module, dims, cfg, log: Callable[[str], None]):
    """(this rank's stages cut from ``model``, their global indices, the number of stages)."""
    v = stages_per_rank(cfg.pipeline_schedule, cfg.stages_per_rank)
    n_stages = dims.pp * v
    ids = stage_ids(cfg.pipeline_schedule, dims.pp_rank, dims.pp, v)
    held = "; ".join(
        f"stage {i}: blocks {','.join(stage_layers(model.config.n_layers, n_stages, i)) or '-'}"
        for i in ids
    )
    log(
        f"pipeline parallel: {dims.pp} ranks × {v} stage(s), {cfg.pipeline_schedule}, "
        f"{cfg.microbatches or n_stages} micro-batches (rank {dims.rank} holds {held})"
    )
    return [cut_stage(model, i, n_stages) for i in ids], ids, n_stages


def make_pipeline(parts: list[nn.Module], modules: list[nn.Module], ids: list[int],
                  n_stages: int, dims, cfg, loss) -> Pipeline:  # fmt: skip
    """The schedule over this rank's stages (``modules``: the parts, or wrappers around them)."""
    return Pipeline(parts, modules, ids, n_stages, cfg.pipeline_schedule,
                    cfg.microbatches or n_stages, dims.group("pp"), dims.device, loss)  # fmt: skip


def build_pipeline(
    model: nn.Module,
    dims,
    cfg,
    loss,
    log: Callable[[str], None],
    wrap: Callable[[nn.Module], nn.Module] = lambda part: part,
) -> Pipeline:
    """Cut ``model`` (whole, initialised) into this rank's stages, parallelize each with
    ``wrap`` (TP, FSDP/DDP; it may return a wrapper) and set up the schedule."""
    parts, ids, n_stages = cut_stages(model, dims, cfg, log)
    return make_pipeline(parts, [wrap(p) for p in parts], ids, n_stages, dims, cfg, loss)
