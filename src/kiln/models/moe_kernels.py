"""The expert MLP on rows sorted by expert, three ways, and the chooser that times them.

``expert_mlp(x, counts, t, activation, kernel)`` computes, for every expert e, its MLP on its
contiguous block of rows (``counts[e]`` rows) with the weights ``t`` (w1, w2, w3, b1, b2 as
3-D/2-D tensors, see kiln.models.moe). Kernels:

- ``grouped``: one ``torch._grouped_mm`` per matrix on the ragged rows.
- ``padded``: rows scattered into a zero-padded [E, R, d] block (R = the largest count rounded
  up to a multiple of :data:`PAD_ROWS`), one ``torch.bmm`` per matrix (oneDNN's batched GEMM,
  AMX on CPUs that have it), the pad rows' results discarded. Pad rows are zero inputs whose
  outputs are dropped, so they get no output gradient and add nothing to any weight gradient:
  forward and backward equal the other kernels.
- ``loop``: one matmul per expert.

``auto`` picks by measurement (:func:`choose_expert_kernel`): at first use per (experts,
d_model, width, row bucket, activation, bias, dtype, device) every kernel that runs here is
timed forward + backward on the real row counts and the fastest is kept, the reason (each
candidate with its time) logged, as kiln.sparsity.kernels.choose_kernel does for sparse layers.
The choice is also written to ``$KILN_CACHE/hardware.json`` (per CPU model and thread count), and
later processes on the machine reuse it, so a resumed run keeps its kernel (they round
differently) and stays bitwise equal to the run it continues.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KERNELS = ("grouped", "padded", "loop")
PAD_ROWS = 32
"""The padded kernel's per-expert row count is a multiple of this (AMX tiles are 16 rows)."""

_CHOICES: dict[tuple, tuple[str, str]] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, widths: list[int]) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU fp32/bf16, CUDA bf16 on sm90+, and row
    strides (each width × element size) that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    size = torch.tensor([], dtype=dtype).element_size()
    if any(w * size % 16 for w in widths):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    return F.gelu


def pad_positions(counts: torch.Tensor, multiple: int = PAD_ROWS) -> tuple[torch.Tensor, int]:
    """(row index of each sorted row in the flattened [E, R] padded block, R)."""
    n_rows = int(counts.sum())
    rows = max(1, -(-int(counts.max()) // multiple)) * multiple if counts.numel() else multiple
    starts = counts.cumsum(0) - counts
    expert = torch.repeat_interleave(
        torch.arange(len(counts), device=counts.device), counts, output_size=n_rows
    )
    pos = expert * rows + torch.arange(n_rows, device=counts.device) - starts[expert]
    return pos, rows


def _mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, kernel: str) -> torch.Tensor:
    """Row block e of x times w[e]ᵀ, for every expert e (x is [E, R, d] for 'padded')."""
    if kernel == "padded":
        return torch.bmm(x, w.transpose(-2, -1))
    if kernel == "grouped":
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    parts = x.split(counts.tolist())
    return torch.cat([p @ w[e].t() for e, p in enumerate(parts)])


def _bias(h: torch.Tensor, b: torch.Tensor | None, expert: torch.Tensor | None):
    """h + the bias of each row's expert (``expert`` None: h is padded [E, R, width])."""
    if b is None:
        return h
    return h + (b[:, None, :] if expert is None else b.index_select(0, expert))


def expert_mlp(x, counts, t: dict, activation: str, kernel: str) -> torch.Tensor:
    """Every expert's MLP on its rows of ``x`` [M, d] (sorted by expert), in x's dtype."""
    pos = None
    if kernel == "padded":
        pos, rows = pad_positions(counts)
        flat = x.new_zeros(len(counts) * rows, x.shape[-1]).index_copy(0, pos, x)
        x = flat.view(len(counts), rows, x.shape[-1])
    expert = None
    if t["b1"] is not None and kernel != "padded":
        expert = torch.repeat_interleave(
            torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
        )
    h = _bias(_mm(x, t["w1"], counts, kernel), t["b1"], expert)
    if t["w3"] is not None:
        h = F.silu(h) * _mm(x, t["w3"], counts, kernel)
    else:
        h = _activation(activation)(h)
    y = _bias(_mm(h.contiguous(), t["w2"], counts, kernel), t["b2"], expert)
    if pos is not None:
        y = y.reshape(-1, y.shape[-1]).index_select(0, pos)
    return y


def available_kernels(device: torch.device, dtype: torch.dtype, widths: list[int]) -> list[str]:
    """The kernels that run for this device and dtype, grouped first (it wins ties)."""
    grouped = ["grouped"] if grouped_mm_supported(device, dtype, widths) else []
    return [*grouped, "padded", "loop"]


def _time_kernel(kernel: str, x, counts, t: dict, activation: str, reps: int) -> float:
    """Fastest of ``reps`` forward + backward runs (after one warm-up), wall-clock."""
    times = []
    for i in range(reps + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        y = expert_mlp(x, counts, t, activation, kernel)
        y.backward(torch.ones_like(y))
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)  # noise on a shared machine only adds time: the fastest run is the cost


def choose_expert_kernel(
    x: torch.Tensor, counts: torch.Tensor, t: dict, activation: str, reps: int = 3, timer=None
) -> tuple[str, str]:
    """(fastest kernel, reason) for these experts on rows like ``x``, measured at first use.

    ``t`` holds the expert tensors in any dtype; they are timed as copies cast to x's dtype.

    Cached per (experts, d_model, width, row bucket, activation, bias, dtype, device); the row
    bucket is the row count's power of two, so capacity-dropped batches of varying size do not
    re-measure. Timed on copies of the weights (no gradient reaches the model) with random rows
    and these counts. ``timer(kernel, x, counts, t, activation, reps)`` replaces the timing
    (tests inject timings). Under ``torch.compile`` tracing nothing is timed: the cached choice
    or the rule grouped-where-supported-else-loop is used.
    """
    w1 = t["w1"]
    widths = [w1.shape[-1], w1.shape[-2]]
    key = (len(counts), *widths, int(x.shape[0]).bit_length(), activation,
           t["b1"] is not None, x.dtype, str(x.device))  # fmt: skip
    if key in _CHOICES:
        return _CHOICES[key]
    kernels = available_kernels(x.device, x.dtype, widths)
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return kernels[0] if kernels[0] == "grouped" else "loop", "not measured while tracing"
    remembered = None if timer else _remembered(key, kernels)
    if remembered is not None:
        _CHOICES[key] = remembered
        return remembered
    measured_here, timer = timer is None, timer or _time_kernel
    # identity saved-tensor hooks shadow any outer ones (activation checkpointing, memory
    # probes), which must not see the timing runs' tensors
    identity = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with torch.inference_mode(False), torch.enable_grad(), identity:
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(x.shape, generator=gen).to(x.device, x.dtype).requires_grad_()
        copies = {k: None if v is None else v.detach().to(x.dtype).clone().requires_grad_()
                  for k, v in t.items()}  # fmt: skip
        counts = counts.detach().clone()
        timings = {k: timer(k, rows, counts, copies, activation, reps) for k in kernels}
    from kiln.sparsity.choose import rank_candidates  # here: sparsity imports the models

    choice = rank_candidates(timings)
    _CHOICES[key] = choice
    log.info("choose_expert_kernel %s: %s", key, choice[1])
    if measured_here:
        _remember(key, choice)
    return choice


def _remembered(key: tuple, kernels: list[str]) -> tuple[str, str] | None:
    """A choice measured by an earlier process on this machine ($KILN_CACHE/hardware.json):
    every process on a machine then runs the same kernel for the same shape, so a resumed run
    computes with the kernel the run it continues used (the kernels differ in rounding)."""
    from kiln.planning.cpu_calibration import recall_choice

    entry = recall_choice("moe-kernel", key)
    if entry is None or entry.get("kernel") not in kernels:
        return None
    return entry["kernel"], f"{entry['kernel']} as measured earlier here ({entry.get('reason')})"


def _remember(key: tuple, choice: tuple[str, str]) -> None:
    from kiln.planning.cpu_calibration import remember_choice

    remember_choice("moe-kernel", key, {"kernel": choice[0], "reason": choice[1]})
