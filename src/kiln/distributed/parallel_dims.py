"""Process-group set-up from torchrun's environment (or a single process without one)."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.config import ParallelConfig


@dataclass
class ParallelDims:
    """Who this process is and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def dp_size(self) -> int:
        """Data-parallel degree (every process is a data-parallel rank for now)."""
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


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
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    return ParallelDims(rank=rank, world_size=world, local_rank=local_rank, device=device)


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
    """Leave the process group. After a failure a collective shutdown could wait on the dead
    rank, so the group is only destroyed locally (gloo) or aborted (NCCL)."""
    if not dist.is_initialized():
        return
    if abort:
        with contextlib.suppress(Exception):
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        return
    dist.destroy_process_group()
