"""This CPU, measured: its name and bf16 matrix instructions, the cache of measurements
(``$KILN_CACHE/hardware.json``), off-chip and fresh-write bandwidth, the fixed cost of a small
kernel, eager element-wise rates and the rate of a step's own GEMM mix. The performance model
(:func:`kiln.planning.hardware.cpu_device`) and benchmarks/perf_vs_measured.py calibrate from
these; the matmul peak itself is :func:`kiln.planning.hardware.measure_cpu_peak`.
torch is imported only inside the measuring functions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kiln.fsio import atomic_write_json


def cache_file() -> Path:
    """Where measured peaks are cached: $KILN_CACHE/hardware.json or ~/.cache/kiln/."""
    root = os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln"
    return Path(root) / "hardware.json"


def cpu_model_name() -> str:
    """CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def measure_cpu_bandwidth(
    cache_path: str | Path | None = None, mbytes: int = 256, reps: int = 5
) -> float:
    """Off-chip memory bandwidth of this CPU in bytes/s: the best of ``reps`` copies of an
    ``mbytes`` MB fp32 tensor (read + write = 2 × size), far larger than any cache; cached
    next to the matmul peak."""
    import torch

    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|copy-bandwidth|mb={mbytes}"
    cache = read_cache(path)
    if isinstance(cache.get(key), dict) and cache[key].get("bytes_per_s", 0) > 0:
        return float(cache[key]["bytes_per_s"])
    n = mbytes * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    best = float("inf")
    for i in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        if i:
            best = min(best, time.perf_counter() - t0)
    bw = 2 * n * 4 / best
    cache[key] = {"bytes_per_s": bw, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, cache)
    return bw


def measure_fresh_write_bandwidth(
    cache_path: str | Path | None = None, mbytes: int = 256, reps: int = 3
) -> float:
    """Bytes/s of writing into new memory: the best ``clone()`` of an ``mbytes`` MB tensor
    (fresh output pages) less its read at the copy bandwidth; cached."""
    import torch

    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|fresh-write|mb={mbytes}"
    cache = read_cache(path)
    if isinstance(cache.get(key), dict) and cache[key].get("bytes_per_s", 0) > 0:
        return float(cache[key]["bytes_per_s"])
    copy_bw = measure_cpu_bandwidth(cache_path, mbytes)
    src = torch.randn(mbytes * 2**20 // 4)
    best = float("inf")
    for i in range(reps + 1):
        t0 = time.perf_counter()
        out = src.clone()
        if i:
            best = min(best, time.perf_counter() - t0)
        del out
    size = src.numel() * 4
    bw = size / max(best - size / copy_bw, 1e-9)
    cache[key] = {"bytes_per_s": bw, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, cache)
    return bw


def measure_kernel_overhead(cache_path: str | Path | None = None, reps: int = 200) -> float:
    """Seconds one small element-wise kernel costs regardless of its size: the median of
    ``reps`` adds of 64K fp32 elements (256 KB, cache-resident), which on an idle machine is
    dispatch plus waking the worker threads, and on a loaded one also waiting for them."""
    import statistics

    import torch

    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|kernel-overhead"
    cache = read_cache(path)
    if isinstance(cache.get(key), dict) and cache[key].get("seconds", 0) > 0:
        return float(cache[key]["seconds"])
    a, b, c = torch.randn(1 << 16), torch.randn(1 << 16), torch.empty(1 << 16)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        times.append(time.perf_counter() - t0)
    secs = statistics.median(times)
    cache[key] = {"seconds": secs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(path, cache)
    return secs


def measure_elementwise(elems: list[int], reps: int = 10) -> tuple[float, float]:
    """(bytes/s, seconds per kernel) of eager element-wise kernels, fitted as
    ``t = overhead + bytes / bw`` by least squares over an out-of-place add (3 passes), GELU
    (2) and GELU backward (3) at each size in ``elems`` (use the step's own ``tokens × d``,
    ``tokens × d_ffn`` and its largest tensor, e.g. the ``vocab × d`` embedding gradient: cache
    effects and first-touch page faults are then the step's own).

    Each point is the *mean* of ``reps`` calls, each writing a new output, not the best: a step
    is measured once, so on a shared machine its kernels pay the average wait for worker
    threads, which a best-of-N copy of 256 MB (offchip_bw) and the median of a tiny add
    (kernel_overhead_s) both leave out. Not cached: it is meant to run next to the step it
    calibrates."""
    import torch
    import torch.nn.functional as F

    points = []
    for n in elems:
        a, b = torch.randn(n), torch.randn(n)
        reps_n = max(2, min(reps, int(2e9 // (12 * n))))  # ≤ ~2 GB moved per kernel and size
        kernels = ((lambda a=a, b=b: torch.add(a, b), 3), (lambda a=a: F.gelu(a), 2),
                   (lambda a=a, b=b: torch.ops.aten.gelu_backward(a, b), 3))  # fmt: skip
        for fn, passes in kernels:
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(reps_n):
                fn()
            points.append((passes * n * 4, (time.perf_counter() - t0) / reps_n))
    return fit_overhead_bandwidth(points)


def measure_gemm_mix(
    gemms: list[tuple[int, int, int, bool, int]], precision: str = "bf16", reps: int = 3
) -> float:
    """The rate (FLOP/s) at which a step's mix of GEMMs runs on this CPU: each
    ``(m, k, n, a_transposed, count)`` is timed (mean of ``reps`` after a warm-up; A given as
    a transposed view where autograd's weight gradients pass one) and the rates combine as the
    mix's total FLOPs over its total time (count-weighted harmonic mean). On a CPU with AMX one
    rate for every shape is wrong by 2–4×: the step's GEMMs run between a third and the whole
    of the square-GEMM peak, by shape (benchmarks/perf_vs_measured.py). Not cached: it is
    meant to run next to the step it calibrates."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    flops = seconds = 0.0
    for m, k, n, a_t, count in gemms:
        a = torch.randn(k, m, dtype=dtype).t() if a_t else torch.randn(m, k, dtype=dtype)
        b = torch.randn(n, k, dtype=dtype).t()  # a weight [out, in] used as x Wᵀ
        torch.mm(a, b)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        flops += 2.0 * m * k * n * count
        seconds += (time.perf_counter() - t0) / reps * count
    return flops / seconds


def fit_overhead_bandwidth(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(bandwidth, overhead) of the least-squares line ``seconds = overhead + bytes / bw``
    through (bytes, seconds) points; overhead is clamped at 0 (refitting through the origin)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    overhead = my - slope * mx
    if overhead < 0 or slope <= 0:
        overhead = 0.0
        slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return 1.0 / slope, overhead


def read_cache(path: Path) -> dict:
    """The cache's JSON object; {} when missing or corrupt (it is re-measured, not an error)."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (json.JSONDecodeError, OSError):
            return {}
    return {}


def cpu_matrix_flags() -> str:
    """Which bf16 matrix instructions /proc/cpuinfo reports (for the record; the calibration
    measures rather than assumes): 'AMX', 'AVX512-BF16' or 'no bf16 instructions'."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 instructions"


def _choice_key(kind: str, fields) -> str:
    import torch

    shape = "|".join(map(str, fields))
    return f"{cpu_model_name()}|threads={torch.get_num_threads()}|{kind}|{shape}"


def recall_choice(kind: str, fields) -> dict | None:
    """A kernel choice of ``kind`` (e.g. 'cpu-attention') that an earlier process measured on
    this machine for ``fields`` (the shape), or None. Choices made by timing are kept here so
    every process on a machine computes the same way for the same shape: the candidates round
    differently, and a resumed run must repeat the run it continues bit for bit."""
    entry = read_cache(cache_file()).get(_choice_key(kind, fields))
    return entry if isinstance(entry, dict) else None


def remember_choice(kind: str, fields, entry: dict) -> None:
    """Keep ``entry`` (the choice and why) for :func:`recall_choice`; a cache that cannot be
    written only costs a measurement next time."""
    path = cache_file()
    try:
        cache = read_cache(path)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        cache[_choice_key(kind, fields)] = {**entry, "measured_at": stamp}
        atomic_write_json(path, cache)
    except OSError:
        pass
