"""Peak FLOP/s per device, for MFU and wall-clock estimates.

GPU and accelerator numbers are vendor datasheet peaks for *dense* matmuls (no 2:4 sparsity),
per device. A CPU has no datasheet number we can trust, so its peak is *measured* — the best
of a few square matmuls — at first use and cached in ``$KILN_CACHE/hardware.json`` (default
``~/.cache/kiln/hardware.json``) keyed by CPU model, torch thread count, precision and size.
The end of each of the first PEAK_SAMPLES successful training runs measures again
(``refine=True``) and the cache keeps the best: one sample taken while the machine is busy can
be several times too low (this shared 2-core VM once cached 224 GFLOP/s for a bf16 peak that
measures ~760 when idle), and a low peak inflates every MFU printed after it. Refining only
after a run succeeded keeps a failed command from touching the cache.
torch is imported only inside the measuring function.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from kiln.errors import ConfigError
from kiln.fsio import atomic_write_json

# name -> {precision: dense peak FLOP/s}. 'bf16' on V100/T4 (no bf16 units) holds the fp16
# tensor-core peak, with the substitution stated in the source string.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100-SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100-PCIE": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "RTX-4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
    "MI300X": {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163.4e12},
    "MI250X": {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12},
    "TPU-V5P": {"bf16": 459e12},
    "TPU-V5E": {"bf16": 197e12},
    "TPU-V4": {"bf16": 275e12},
}

# Extra spellings (normalised: lower case, no spaces/dashes/underscores) -> table name.
_ALIASES = {"h100": "H100-SXM", "h100sxm5": "H100-SXM", "gh200": "H200", "4090": "RTX-4090"}

PRECISIONS = ("bf16", "fp16", "fp32")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-_]+", "", name.lower())


def resolve_device(device_name: str) -> str | None:
    """Table name matching ``device_name`` (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100-SXM').

    The longest table name or alias contained in the normalised device string wins, so
    'H100 PCIe' is not taken for the SXM part.
    """
    n = _norm(device_name)
    keys = {_norm(k): k for k in PEAK_FLOPS} | _ALIASES
    hits = [k for k in keys if k in n]
    return keys[max(hits, key=len)] if hits else None


def peak_flops(device_name: str, precision: str = "bf16") -> tuple[float, str]:
    """(dense peak FLOP/s, where the number comes from) for a named accelerator."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}."
        )
    name = resolve_device(device_name)
    if name is None:
        raise ConfigError(
            f"Device {device_name!r} is not in the peak-FLOPs table; use 'cpu' or one of "
            f"{', '.join(PEAK_FLOPS)}."
        )
    table = PEAK_FLOPS[name]
    if precision in table:
        return table[precision], f"{name} {precision} dense peak (vendor datasheet)"
    if precision == "bf16" and "fp16" in table:
        return table["fp16"], f"{name} has no bf16 units; fp16 dense tensor peak (datasheet)"
    raise ConfigError(f"Device {name} has no {precision} peak in the table; "
                      f"use one of {', '.join(table)}.")  # fmt: skip


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


def _measure_matmul(device: str, precision: str, size: int, reps: int) -> float:
    """Best FLOP/s of ``reps`` timed ``size``² matmuls after two warm-ups (2·n³ FLOPs each)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


PEAK_SAMPLES = 3
"""Measurements (one per use) before a cached CPU peak is final."""


def measure_cpu_peak(
    precision: str = "bf16",
    cache_path: str | Path | None = None,
    size: int = 2048,
    reps: int = 5,
    refine: bool = False,
) -> float:
    """Measured matmul FLOP/s of this CPU at ``precision``, cached per machine; with
    ``refine``, measure again (a fraction of a second) until PEAK_SAMPLES samples are cached,
    keeping the best."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}."
        )
    import torch

    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|{precision}|n={size}"
    cache: dict = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}  # a corrupt cache is re-measured and rewritten, not an error
    entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
    best, samples = float(entry.get("flops", 0) or 0), int(entry.get("samples", 1 if entry else 0))
    if best > 0 and (samples >= PEAK_SAMPLES or not refine):
        return best
    flops = _measure_matmul("cpu", precision, size, reps)
    if flops > best:
        best = flops
        entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    cache[key] = {**entry, "flops": best, "samples": samples + 1}
    atomic_write_json(path, cache)
    return best


def device_peak(device: str, precision: str = "bf16") -> tuple[float, str]:
    """(peak FLOP/s, source) for 'cpu' (measured, cached), 'cuda' or a table name.

    For 'cuda' the name from ``torch.cuda.get_device_name()`` is looked up in the table; an
    unknown GPU is measured like a CPU (not cached) rather than assumed to be an A100.
    """
    if device == "cpu":
        flops = measure_cpu_peak(precision)
        return flops, f"measured {precision} matmul on {cpu_model_name()} (cached)"
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        if resolve_device(name) is not None:
            try:
                return peak_flops(name, precision)
            except ConfigError:
                pass
        return _measure_matmul(device, precision, 4096, 10), f"measured {precision} on {name}"
    return peak_flops(device, precision)


def resolve_precision(requested: str, device_type: str) -> tuple[str, str]:
    """``train.precision`` → ('bf16' | 'fp32', why). 'auto' measures instead of assuming:

    * CUDA: bf16 where the GPU supports it (Ampere and newer), else fp32;
    * CPU: the faster of bf16 and fp32 matmuls, timed once per machine (512² probes, cached
      with the CPU peak). CPUs differ by an order of magnitude: with AMX or AVX512-BF16 bf16 is
      2–5× faster than fp32, but a CPU with AVX2 only emulates bf16 and runs it ~10× slower.
    """
    if requested != "auto":
        return requested, f"train.precision {requested}"
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU has bf16"
        return "fp32", "auto: this GPU has no bf16"
    bf16 = measure_cpu_peak("bf16", size=512, reps=2)
    fp32 = measure_cpu_peak("fp32", size=512, reps=2)
    pick = "bf16" if bf16 >= fp32 else "fp32"
    return pick, (
        f"auto: bf16 matmul {bf16 / 1e9:,.1f} vs fp32 {fp32 / 1e9:,.1f} GFLOP/s measured on "
        f"this CPU"
    )
