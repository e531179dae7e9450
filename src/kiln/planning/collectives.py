"""What one collective costs between the processes of this machine (gloo), measured the way
kiln.planning.hardware measures matmuls: at first use, once per machine and process count,
cached in ``$KILN_CACHE/hardware.json``.

Each kind — all-reduce, all-gather, reduce-scatter, point-to-point send — is timed at a few
message sizes in groups of every size that divides the process count (all processes busy at
once, split into groups of that size, as the groups of one layout run side by side), and fitted
as ``seconds = latency + bytes / bandwidth``
(:func:`kiln.planning.hardware.fit_overhead_bandwidth`).
``bytes`` is the whole message: the tensor of an all-reduce or a send, the output of an
all-gather, the input of a reduce-scatter. The kinds differ far more than a ring formula says:
on the 2-core Xeon dev VM a 16 MB all-gather between 2 processes took 3× and a reduce-scatter
5× the time of an 8 MB all-reduce moving the same bytes per rank; with 4 processes on 2 cores,
17× and 28×. Each collective is timed between computations, as in a training step, so the fit
includes the waits the step pays: ranks that drift apart and, with more processes than cores,
a peer that has to be scheduled first.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send")
SIZES = (2**12, 2**18, 2**21, 2**23)
"""Message bytes timed (4 KB to 8 MB: from the latency to the bandwidth regime)."""


@dataclass(frozen=True)
class CollectiveFit:
    """seconds = latency_s + bytes / bytes_per_s for one kind in groups of ``group`` ranks."""

    kind: str
    group: int
    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float, calls: float = 1.0) -> float:
        """``calls`` collectives moving ``nbytes`` in all."""
        return calls * self.latency_s + nbytes / self.bytes_per_s


def group_sizes(processes: int) -> list[int]:
    """Group sizes measured for ``processes`` ranks: every divisor ≥ 2."""
    return [g for g in range(2, processes + 1) if processes % g == 0]


def measure_collectives(
    processes: int, cache_path: str | Path | None = None, sizes: tuple[int, ...] = SIZES
) -> tuple[CollectiveFit, ...]:
    """The fits for ``processes`` gloo ranks on this machine (one torch thread each, as
    torchrun starts them), cached per CPU model and process count; measured (a few seconds,
    ``processes`` processes) when not cached."""
    from kiln.fsio import atomic_write_json
    from kiln.planning.cpu_calibration import cache_file, cpu_model_name, read_cache

    path = Path(cache_path) if cache_path else cache_file()
    prefix = f"{cpu_model_name()}|gloo|processes={processes}"
    cache = read_cache(path)
    keys = {(k, g): f"{prefix}|group={g}|{k}" for g in group_sizes(processes) for k in KINDS}
    if all(isinstance(cache.get(v), dict) for v in keys.values()):
        return tuple(CollectiveFit(k, g, cache[v]["latency_s"], cache[v]["bytes_per_s"])
                     for (k, g), v in keys.items())  # fmt: skip
    fits = _spawn(processes, sizes)
    cache = read_cache(path)  # re-read: another process may have written meanwhile
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for f in fits:
        cache[keys[f.kind, f.group]] = {"latency_s": f.latency_s, "bytes_per_s": f.bytes_per_s,
                                        "measured_at": stamp}  # fmt: skip
    atomic_write_json(path, cache)
    return fits


def _spawn(processes: int, sizes: tuple[int, ...]) -> tuple[CollectiveFit, ...]:
    import torch.multiprocessing as mp

    from kiln.planning.hardware import fit_overhead_bandwidth

    with tempfile.TemporaryDirectory(prefix="kiln-gloo-") as tmp:
        mp.start_processes(_worker, args=(processes, tmp, sizes), nprocs=processes,
                           start_method="spawn")  # fmt: skip
        points = json.loads(Path(tmp, "points.json").read_text())
    return tuple(CollectiveFit(k, g, *reversed(fit_overhead_bandwidth(
        [(b, s) for gg, kk, b, s in points if (gg, kk) == (g, k)])))
        for g in group_sizes(processes) for k in KINDS)  # fmt: skip


def _worker(rank: int, world: int, tmp: str, sizes: tuple[int, ...]) -> None:
    """One rank: for each group size, kind and size, the mean seconds a collective adds to a
    loop that computes between collectives (as a training step does: ranks drift apart and,
    with more processes than cores, wait for a peer to be scheduled), every group at once:
    (loop with the collective − loop of the computation alone) / iterations, rank 0's clock."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)  # fmt: skip
    a = torch.randn(192, 192)
    work = lambda: [a @ a for _ in range(20)]  # noqa: E731  (~2 ms on one core)
    points = []
    for g in group_sizes(world):
        groups = [dist.new_group(list(range(i, i + g))) for i in range(0, world, g)]
        pg, me = groups[rank // g], rank % g
        for nbytes in sizes:
            n = max(1, nbytes // 4)
            reps = 4 if nbytes >= 2**22 else 12
            for kind in KINDS:
                fn = _op(kind, n, g, me, pg, rank)
                fn()  # warm-up
                loops = []
                for body in ((work,), (work, fn)):
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        for f in body:
                            f()
                    dist.barrier()
                    loops.append((time.perf_counter() - t0) / reps)
                points.append((g, kind, n * 4, max(loops[1] - loops[0], 1e-6)))
    if rank == 0:
        Path(tmp, "points.json").write_text(json.dumps(points))
    dist.destroy_process_group()


def _op(kind: str, n: int, g: int, me: int, pg, rank: int):
    """The collective of ``kind`` on a message of ``n`` fp32 elements (see the docstring)."""
    import torch
    import torch.distributed as dist

    if kind == "all_reduce":
        x = torch.ones(n)
        return lambda: dist.all_reduce(x, group=pg)
    if kind == "all_gather":
        x, out = torch.ones(max(1, n // g)), torch.empty(max(1, n // g) * g)
        return lambda: dist.all_gather_into_tensor(out, x, group=pg)
    if kind == "reduce_scatter":
        x, out = torch.ones(max(1, n // g) * g), torch.empty(max(1, n // g))
        return lambda: dist.reduce_scatter_tensor(out, x, group=pg)
    x = torch.ones(n)  # send: even local ranks to the next, which receives
    if me % 2 == 0:
        return lambda: dist.send(x, rank + 1) if me + 1 < g else None
    return lambda: dist.recv(x, rank - 1)
