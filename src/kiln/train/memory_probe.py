"""Measure the peak memory per rank of a few real training steps under a layout (CPU, gloo), to
hold kiln.train.memory's estimate against.

Each rank runs what ``kiln train`` runs after its data is ready — malloc keeps freed memory
(kiln.train.malloc), the model is built on meta and :func:`parallelize_model` applies the layout
and allocates this rank's shards, AdamW per model part, and the Trainer's own ``train_step``
(micro-batches or the pipeline schedule, clipping, optimizer step, ``zero_grad(set_to_none)``)
— on random tokens.
Before that it runs the same layout on a tiny model, so torch's and gloo's one-off buffers land
in the baseline. The measured value is the increase of the process's peak resident set
(``ru_maxrss``) from that baseline to the end: what the estimate counts, without the Python /
torch runtime.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import ParallelConfig, TrainConfig
from kiln.models.gpt import GPTConfig


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RandomTokens:
    """The loader the Trainer asks for a batch: fixed random tokens (this rank's share)."""

    def __init__(self, vocab: int, batch: int, seq_len: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randint(0, vocab, (2, batch, seq_len), generator=g)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def _steps(shape: GPTConfig, cfg: ParallelConfig, dims, batch: int, seq_len: int,
           micro_batch: int | None, precision: str, steps: int) -> None:  # fmt: skip
    from kiln.distributed.materialize import meta_model
    from kiln.distributed.parallelize import parallelize_model
    from kiln.train.optim import LRSchedule, Optimizers, build_optimizer
    from kiln.train.plan import loop_plan
    from kiln.train.trainer import Trainer

    built = parallelize_model(meta_model(shape), dims, cfg, False, lambda _: None, seed=0)
    train = TrainConfig(batch_size=batch, micro_batch_size=micro_batch, precision=precision,
                        eval_every=0)  # fmt: skip
    opts = [build_optimizer(part, train) for part in built.model_parts]
    local = batch // dims.dp_size
    plan = loop_plan(steps, batch, micro_batch or local, seq_len, dims.world_size)
    trainer = Trainer(
        built, opts[0] if len(opts) == 1 else Optimizers(opts),
        LRSchedule(1e-4, 0, steps, 1.0, "linear"),
        _RandomTokens(shape.vocab_size, local, seq_len, dims.dp_rank), [], train, plan, dims,
    )  # fmt: skip
    for _ in range(steps):
        trainer.train_step()


def _warm_shape(shape: GPTConfig, cfg: ParallelConfig) -> GPTConfig:
    """A tiny model of the same kind that the layout accepts."""
    t = cfg.tensor
    return shape.replace(n_layers=max(2, cfg.pipeline * 2), d_model=16 * t, n_heads=t,
                         n_kv_heads=t, d_head=16, d_ffn=16 * t, vocab_size=64)  # fmt: skip


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed probe leaves nothing)."""
    import ctypes
    import signal
    import sys

    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(rank: int, world: int, port: int, out: str, job: dict) -> None:
    from kiln.distributed.parallel_dims import ParallelDims
    from kiln.train.malloc import keep_freed_memory

    _die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(job["threads"])
    os.environ["KILN_MALLOC_TUNING"] = job["malloc"]
    keep_freed_memory()  # as kiln train does on CPU
    cfg = ParallelConfig(**job["parallel"])
    shape = GPTConfig(**job["shape"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=job["timeout_s"]))  # fmt: skip
    try:
        dims = ParallelDims.from_config(cfg, rank, world, rank, torch.device("cpu"))
        args = (job["batch"], job["seq_len"], job["micro_batch"], job["precision"])
        _steps(_warm_shape(shape, cfg), cfg, dims, *args, steps=1)
        gc.collect()
        base = _rss()
        _steps(shape, cfg, dims, *args, steps=job["steps"])
        peaks: list = [None] * world
        dist.all_gather_object(peaks, _rss() - base)
        if rank == 0:
            Path(out).write_text(json.dumps(peaks))
    finally:
        dist.destroy_process_group()


def _launch(jobs: list[dict], out: str) -> None:
    """In a fresh interpreter: import once, then fork each job's ranks from this small process
    (a fork starts in milliseconds; a spawned rank would import torch again)."""
    import kiln.distributed.materialize  # noqa: F401
    import kiln.distributed.parallelize  # noqa: F401  (imported once, before the forks)

    _die_with_parent()
    results = []
    for i, job in enumerate(jobs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = f"{out}.{i}"
        mp.start_processes(_worker, args=(job["world"], port, path, job), nprocs=job["world"],
                           start_method="fork")  # fmt: skip
        results.append(json.loads(Path(path).read_text()))
    Path(out).write_text(json.dumps(results))


@dataclasses.dataclass
class Probe:
    """One measured run: ``steps`` training steps of ``shape`` under ``parallel`` on
    ``world`` gloo ranks with global batch ``batch``."""

    shape: GPTConfig
    parallel: ParallelConfig
    world: int
    batch: int
    seq_len: int
    micro_batch: int | None = None
    precision: str = "fp32"
    steps: int = 3
    threads: int = 1
    timeout_s: float = 600.0
    malloc: str = "1"
    """KILN_MALLOC_TUNING for the ranks (kiln.train.malloc): "1" keeps freed memory (kiln
    train's default on CPU), "memory" returns large blocks to the kernel at once."""


def measure_peaks(probes: list[Probe]) -> list[list[int]]:
    """For each probe, the peak resident-set increase (bytes) of each of its ranks."""
    jobs = []
    for p in probes:
        job = dataclasses.asdict(p)  # nested dataclasses become dicts
        jobs.append(job)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "peaks.json")
        proc = ctx.Process(target=_launch, args=(jobs, out))
        proc.start()
        try:
            proc.join()
        finally:  # interrupted (a test timeout): its ranks die with it
            if proc.is_alive():
                proc.kill()
        if proc.exitcode != 0:
            raise RuntimeError(f"the memory probe exited with code {proc.exitcode}")
        return json.loads(Path(out).read_text())
