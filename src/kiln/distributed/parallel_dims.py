"""Process-group set-up from torchrun's environment (or a single process without one)."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from kiln.config import ParallelConfig

MESH_AXES = ("pp", "dp_replicate", "dp_shard", "tp")
"""The device mesh's axes, outermost first."""
EXPERT_AXES = ("pp", "dp_replicate", "edp_shard", "ep", "tp")
"""The expert region's mesh (``parallel.expert`` > 1): the same ranks, with ``dp_shard`` split
into ``edp_shard`` × ``ep`` (ep innermost), as torchtitan borrows EP from the data-shard ranks."""


@dataclass
class ParallelDims:
    """Who this process is, where it computes, and the ONE device mesh every parallel layout
    and every collective takes its group from.

    The world is laid out as ``pp × dp_replicate × dp_shard × tp`` (tp innermost, so a tensor-
    parallel group is the closest ranks). ``dp_shard`` is what the other degrees leave of the
    world size. With ``parallel.data ddp`` the data-parallel ranks (dp_replicate × dp_shard)
    replicate the model; with ``fsdp`` the model is sharded along dp_shard and replicated along
    dp_replicate (HSDP when both are > 1).

    Expert parallelism borrows its ``ep`` ranks from ``dp_shard``: the experts of each MoE layer
    are split over ``ep``, and the ranks holding the same experts (``edp``: dp_replicate ×
    dp_shard / ep) are that region's data-parallel replicas. Every rank stays a data-parallel
    rank with its own slice of the batch; dense parameters are data-parallel over all of them."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    ep: int = 1
    timeout_s: float | None = None
    """Timeout of every mesh group's collectives (None: torch's default for a new group)."""

    def __post_init__(self) -> None:
        fixed = self.tp * self.pp * self.dp_replicate
        if self.world_size % fixed != 0:
            from kiln.errors import ConfigError

            raise ConfigError(
                f"parallel.tensor {self.tp} × parallel.pipeline {self.pp} × "
                f"parallel.data_replicate {self.dp_replicate} = {fixed} does not divide the "
                f"world size {self.world_size}; choose degrees whose product divides it (what "
                "remains becomes the data-shard degree)."
            )
        if self.ep > 1 and self.distributed and self.dp_shard % self.ep:
            # (one process: JobConfig.validate names it, after the expert count)
            from kiln.errors import ConfigError

            raise ConfigError(
                f"parallel.expert {self.ep} does not divide the data-shard degree "
                f"{self.dp_shard} (the world size {self.world_size} over tensor × pipeline × "
                "data_replicate); expert parallelism borrows its ranks from the data-shard "
                "ranks, so choose a divisor of it."
            )
        self._mesh: DeviceMesh | None = None
        self._flat: dict[str, DeviceMesh] = {}

    @classmethod
    def from_config(cls, cfg: ParallelConfig, rank: int, world_size: int, local_rank: int,
                    device: torch.device) -> ParallelDims:  # fmt: skip
        return cls(rank, world_size, local_rank, device, cfg.tensor, cfg.pipeline,
                   cfg.data_replicate, cfg.expert, cfg.timeout_s)  # fmt: skip

    @property
    def dp_shard(self) -> int:
        return self.world_size // (self.tp * self.pp * self.dp_replicate)

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many different batches one step sees (replicate × shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def degrees(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, (self.pp, self.dp_replicate, self.dp_shard, self.tp)))

    @property
    def mesh(self) -> DeviceMesh | None:
        """The device mesh (None in a single process), built on first use with the flattened
        ``dp`` (replicate × shard) axis that the loader, the loss and DDP use."""
        if self._mesh is None and self.distributed:
            from torch.distributed.device_mesh import init_device_mesh

            degrees = self.degrees
            options = group_options(self.device.type, self.timeout_s)
            mesh = init_device_mesh(
                self.device.type, tuple(degrees.values()), mesh_dim_names=tuple(degrees),
                backend_override=None if options is None else dict.fromkeys(degrees, options),
            )  # fmt: skip
            dp = mesh["dp_replicate", "dp_shard"]
            self._flat = {"dp": dp._flatten("dp", backend_override=options)}
            if self.ep > 1:
                self._flat.update(self._expert_meshes(options))
            self._mesh = mesh
        return self._mesh

    def _expert_meshes(self, options: tuple | None) -> dict[str, DeviceMesh]:
        """'ep' (ranks splitting the experts) and 'edp' (ranks holding the same experts)."""
        from torch.distributed.device_mesh import init_device_mesh

        sizes = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.tp)
        mesh = init_device_mesh(
            self.device.type, sizes, mesh_dim_names=EXPERT_AXES,
            backend_override=None if options is None else dict.fromkeys(EXPERT_AXES, options),
        )  # fmt: skip
        edp = mesh["dp_replicate", "edp_shard"]._flatten("edp", backend_override=options)
        return {"ep": mesh["ep"], "edp": edp}

    def _coordinate(self, axis: str) -> int:
        mesh = self.submesh(axis)
        return 0 if mesh is None else mesh.get_local_rank()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which slice of a batch it reads)."""
        return self._coordinate("dp")

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @property
    def tp_rank(self) -> int:
        return self._coordinate("tp")

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along ``axis`` ('pp', 'dp', 'dp_replicate', 'dp_shard', 'tp', and
        with parallel.expert > 1 'ep', 'edp'); None in a single process."""
        mesh = self.submesh(axis)
        return None if mesh is None else mesh.get_group()

    def submesh(self, *axes: str) -> DeviceMesh | None:
        """The mesh along ``axes`` (a flattened or expert one, like 'dp' or 'ep', kept as it
        was made)."""
        mesh = self.mesh
        if mesh is None:
            return None
        if len(axes) == 1 and axes[0] in self._flat:
            return self._flat[axes[0]]
        return mesh[axes]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def group_options(device_type: str, timeout_s: float | None) -> tuple | None:
    """The (backend, options) that give a mesh group the job's timeout, or None for torch's.

    ``init_device_mesh`` creates the groups of the axes narrower than the world with torch's
    default timeout (30 min on gloo, 10 on NCCL), not the one ``init_process_group`` was
    given, so a silent rank would hold its tensor- or pipeline-parallel peers that long. The
    timeout has to be given when a group is created: gloo's point-to-point receives (the
    pipeline's) wait on the timeout the group was born with."""
    if timeout_s is None:
        return None
    from torch._C._distributed_c10d import Backend  # the options type DeviceMesh takes

    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return "nccl", options
    return "gloo", Backend.Options("gloo", timeout)  # gloo reads only the timeout


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from kiln.errors import ConfigError

        raise ConfigError("run.device is 'cuda' but no CUDA device is available; use 'cpu'.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg: ParallelConfig, device_preference: str = "auto") -> ParallelDims:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), with a timeout
    so that a dead rank ends the job with an error instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    dims = ParallelDims.from_config(cfg, rank, world, local_rank, device)  # checks the degrees
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    _ = dims.mesh  # every rank builds it now (creating its groups is collective)
    return dims


class RankFailure(Exception):
    """Another rank died or went silent; the message is one sentence (not a user error)."""


FAILURE_SIGNS = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                 "nccl", "gloo", "socket", "peer")  # fmt: skip


def failure_detail(exc: BaseException) -> str:
    """The readable part of a collective's error: source-location prefixes dropped."""
    import re

    text = " ".join(str(exc).split())
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)[:160]


def looks_like_rank_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer is gone (gloo: RuntimeError naming
    the closed connection or the timeout; NCCL/c10d: DistError)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in FAILURE_SIGNS)


def shutdown(abort: bool = False) -> None:
    """Leave the process group: together after a barrier when the run ended normally (a rank
    that tears its gloo pairs down while a peer still uses them can abort that peer). After a
    failure a collective shutdown could wait on the dead rank, so the group is only destroyed
    locally (gloo) or aborted (NCCL)."""
    if not dist.is_initialized():
        return
    if abort:
        with contextlib.suppress(Exception):
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        return
    dist.barrier()
    dist.destroy_process_group()
