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

import re
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError
from kiln.fsio import atomic_write_json
from kiln.planning.cpu_calibration import (  # noqa: F401  (re-exported: hardware.* still works)
    cache_file,
    cpu_matrix_flags,
    cpu_model_name,
    fit_overhead_bandwidth,
    measure_cpu_bandwidth,
    measure_elementwise,
    measure_fresh_write_bandwidth,
    measure_gemm_mix,
    measure_kernel_overhead,
    read_cache,
)

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
    size: int | None = None,
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

    if size is None:  # 2048², or 512² where a probe finds no fast path (minutes otherwise)
        size = calibration_size(precision, cache_path)
    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|{precision}|n={size}"
    cache = read_cache(path)  # a corrupt cache is re-measured and rewritten, not an error
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


# -- the performance-model hardware table ---------------------------------------------------
@dataclass(frozen=True)
class Device:
    """What the performance model (kiln.planning.perf) needs of one device, with sources.

    ``None`` marks a number the vendor has not published; the entry's ``source`` says so.
    Bandwidths are bytes/s, memories bytes, peaks dense FLOP/s (no 2:4 sparsity).
    """

    name: str
    peak_bf16: float | None
    """Dense bf16 matmul peak."""
    vector_flops: float | None
    """Peak of element-wise (non-matmul) arithmetic, fp32; None = use peak_bf16."""
    offchip_bw: float | None
    """Off-chip memory bandwidth (HBM, DDR, or the weight-streaming link for CS-2)."""
    onchip_bytes: float | None
    """On-chip memory a fused kernel can keep data in (L2 / Infinity Cache / SRAM)."""
    link_bw: float | None
    """Device-to-device link bandwidth (NVLink, Infinity Fabric), total per device."""
    source: str
    """Where each number comes from (datasheet name and year, or 'measured')."""
    matmul_efficiency: float = 0.8
    """Fraction of peak_bf16 large matmuls reach (an assumption for datasheet peaks; 1.0 for
    a measured peak, which already is an achieved rate)."""
    fresh_write_bw: float | None = None
    """Bandwidth of writing freshly allocated memory (first touch: page faults). Eager CPU
    kernels write activations and gradients into new allocations; None = offchip_bw (GPU
    caching allocators reuse memory)."""
    kernel_overhead_s: float = 0.0
    """Fixed cost of one kernel (dispatch, launch, waking worker threads). Not a datasheet
    number, so 0 in the table entries; measured for the CPU (:func:`measure_kernel_overhead`)."""
    host_link_bw: float | None = None
    """Bytes/s between the device and host memory, one direction (PCIe); what CPU offload
    moves parameters and gradients over. None = not published or no host link."""
    price_per_hour: float | None = None
    """Public on-demand cloud price of one device for one hour (USD); None where none is
    published."""
    elementwise_bw: float | None = None
    """Effective bandwidth of eager element-wise kernels at a step's own tensor sizes, fitted
    together with kernel_overhead_s (:func:`measure_elementwise`); None = charge them at
    offchip_bw / fresh_write_bw like any other op."""
    attention_flops: float | None = None
    """Achieved FLOP/s of attention's score and value matmuls (the model's count: the full
    T × T, plus what a fused kernel recomputes) on the kernel a CPU step uses, measured at the
    step's shape (benchmarks/perf_vs_measured.py); None = the matmul rate. A CPU's flash kernel
    runs far below its GEMM rate (~0.1 of it on the AMX Xeon). The timing covers the whole
    path (scores, mask, softmax, values, forward and backward), so with a rate set the model
    charges the softmax no time of its own (kiln.planning.perf.cost)."""


DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        Device("A100", 312e12, 19.5e12, 2.039e12, 40e6, 600e9,
               "NVIDIA A100 Tensor Core GPU datasheet (2021, SXM4 80GB: 312 TFLOPS bf16, "
               "19.5 fp32, 2,039 GB/s HBM2e, NVLink 600 GB/s); 40 MB L2 from the NVIDIA A100 "
               "Tensor Core GPU Architecture whitepaper (2020); host link PCIe Gen4 x16, 32 GB/s "
               "each way (same datasheet: 64 GB/s); price: AWS EC2 on-demand p4d.24xlarge "
               "(8 × A100 40GB) $32.77/h, us-east-1 list price = $4.10 per GPU-hour (the 80GB "
               "p4de lists higher)",
               host_link_bw=32e9, price_per_hour=32.77 / 8),
        Device("H100", 989e12, 67e12, 3.35e12, 50e6, 900e9,
               "NVIDIA H100 Tensor Core GPU datasheet (2023, SXM5: 989 TFLOPS bf16 dense, 67 "
               "fp32, 3.35 TB/s HBM3, NVLink 900 GB/s); 50 MB L2 from the NVIDIA H100 Tensor "
               "Core GPU Architecture whitepaper (2022); host link PCIe Gen5 x16, 64 GB/s each "
               "way (same datasheet: 128 GB/s); price: AWS EC2 on-demand p5.48xlarge (8 × "
               "H100) $98.32/h, us-east-1 list price = $12.29 per GPU-hour",
               host_link_bw=64e9, price_per_hour=98.32 / 8),
        Device("H200", 989e12, 67e12, 4.8e12, 50e6, 900e9,
               "NVIDIA H200 Tensor Core GPU datasheet (2024, SXM: 989 TFLOPS bf16 dense, 67 "
               "fp32, 4.8 TB/s HBM3e, NVLink 900 GB/s); L2 as H100 (same GH100 die, H100 "
               "architecture whitepaper 2022). Not calibrated: no GPU was available; host link "
               "PCIe Gen5 x16, 64 GB/s each way (same datasheet: 128 GB/s); no on-demand price "
               "was found to cite",
               host_link_bw=64e9),
        Device("MI300X", 1307.4e12, 163.4e12, 5.3e12, 256e6, 896e9,
               "AMD Instinct MI300X data sheet (2023: 1,307.4 TFLOPS bf16 dense, 163.4 fp32, "
               "5.3 TB/s HBM3, 256 MB Infinity Cache, 7 Infinity Fabric links × 128 GB/s, "
               "PCIe Gen5 x16 host interface 64 GB/s each way); no on-demand price was found "
               "to cite",
               host_link_bw=64e9),
        Device("SN30", 640e12, None, None, 640e6, None,
               "SN10 RDU: >320 TFLOPS bf16 and 320 MB on-chip SRAM (SambaNova, Hot Chips 33, "
               "2021); SN30 RDU = two SN10 dies (The Next Platform, 2022-09-17), so 2× each. "
               "DDR4 bandwidth and link bandwidth are not published"),
        Device("SN40L", 638e12, None, 1.6e12, 520e6, None,
               "SambaNova SN40L RDU, Hot Chips 2024 (Prabhakar): 638 TFLOPS bf16, 520 MB "
               "on-chip SRAM, 64 GB HBM; HBM 25.6 TB/s per 16 sockets (1.6 TB/s each). DDR "
               "(1.6 TB/s per 16 sockets) and link bandwidths per socket are not separately "
               "published"),
        Device("CS-2", None, None, 150e9, 40e9, None,
               "Cerebras CS-2 datasheet (2021): WSE-2 with 40 GB on-chip SRAM (20 PB/s), "
               "system I/O 1.2 Tb/s (12 × 100 GbE), which weight streaming uses to bring "
               "weights in from MemoryX; no dense bf16 peak is published"),
    ]
}  # fmt: skip


def cpu_device(cache_path: str | Path | None = None) -> Device:
    """This CPU as a Device: bf16 and fp32 matmul peaks and copy bandwidth, measured and
    cached. On-chip memory and links are left out (caches are not managed memory)."""
    sizes = {p: calibration_size(p, cache_path) for p in ("bf16", "fp32")}
    bf16 = measure_cpu_peak("bf16", cache_path, size=sizes["bf16"])
    fp32 = measure_cpu_peak("fp32", cache_path, size=sizes["fp32"])
    bw = measure_cpu_bandwidth(cache_path)
    overhead = measure_kernel_overhead(cache_path)
    fresh = measure_fresh_write_bandwidth(cache_path)
    src = (f"measured on {cpu_model_name()} ({cpu_matrix_flags()}): best bf16 "
           f"{sizes['bf16']}² and fp32 {sizes['fp32']}² matmuls, and a 256 MB copy; cached in "
           f"{Path(cache_path or cache_file())}")  # fmt: skip
    return Device("cpu", bf16, fp32, bw, None, None, src, 1.0, fresh, overhead)


def calibration_size(precision: str, cache_path: str | Path | None = None) -> int:
    """2048, unless a 256² probe shows the precision has no fast path here (bf16 on a CPU
    without AVX512-BF16 or AMX runs at well under 1 GFLOP/s): then 512, so that calibrating
    takes seconds, not many minutes. The answer is cached per machine like the peaks, so a
    start-up that finds its peaks cached measures nothing."""
    import torch

    path = Path(cache_path) if cache_path else cache_file()
    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|{precision}|calibration_size"
    cache = read_cache(path)
    if isinstance(cache.get(key), int):
        return cache[key]
    size = 2048 if _measure_matmul("cpu", precision, 256, 1) > 5e9 else 512
    cache[key] = size
    atomic_write_json(path, cache)
    return size


def perf_device(name: str, cache_path: str | Path | None = None) -> Device:
    """A DEVICES entry by (case-insensitive) name, or 'cpu' (measured)."""
    if name.lower() == "cpu":
        return cpu_device(cache_path)
    for key, dev in DEVICES.items():
        if _norm(key) == _norm(name):
            return dev
    raise ConfigError(f"device {name!r} is not in the hardware table; use cpu or one of "
                      f"{', '.join(DEVICES)}.")  # fmt: skip


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
