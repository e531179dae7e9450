"""Causal bf16 attention on CPU: torch's flash kernel (SDPA) or Kiln's matmul path, by measurement.

:func:`kiln.models.gpt.attention` has two ways to run causal, unmasked bf16 self-attention on a
CPU: ``scaled_dot_product_attention`` (the flash kernel, which recomputes the probabilities in
backward) and two bf16 matmuls around an fp32 softmax (which keeps the probabilities). Which is
faster depends on the CPU, not on the shape alone: at B=4, H=12, T=512, d_head=64 the matmul
path was 2.5× faster for forward + backward on an AVX2 AMD EPYC, while on an Intel Xeon with
AMX tiles the flash kernel was 2.3× faster in one run and level (±10%) in another on the
loaded machine (benchmarks/cpu_attention.py). So it is measured,
never assumed from the CPU's name: :func:`choose_cpu_attention` times both on the run's shape
and :func:`apply_cpu_attention` sets the answer on every :class:`~kiln.models.gpt.Attention`
(``train.cpu_attention: auto``, the default), once, before training starts.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.gpt import Attention, attention, uses_matmul_attention

log = logging.getLogger(__name__)

__all__ = ["apply_cpu_attention", "choose_cpu_attention"]


def _fwd_bwd_seconds(fn, q, k, v, reps: int) -> float:
    """Fastest of ``reps`` forward + backward runs after one warm-up (load only adds time)."""
    best = float("inf")
    for i in range(reps + 1):
        start = time.perf_counter()
        y = fn(q, k, v)
        torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def choose_cpu_attention(
    batch: int, heads: int, seq: int, d_head: int, reps: int = 2
) -> tuple[bool, dict[str, float]]:
    """(use the matmul path?, fwd+bwd seconds of each) for causal bf16 attention of this shape
    on this CPU; the matmul path wins only when strictly faster. Times rounds alternately."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq, d_head, generator=gen, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    candidates = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "matmul": lambda q, k, v: attention(q, k, v, None, True, None, False),
    }
    times = {name: float("inf") for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            times[name] = min(times[name], _fwd_bwd_seconds(fn, q, k, v, 1))
    return times["matmul"] < times["sdpa"], times


def _auto_choice(batch: int, heads: int, seq: int, d_head: int) -> tuple[bool, str]:
    """(use the matmul path?, why): the choice an earlier process measured on this machine for
    this shape, else measured now and remembered ($KILN_CACHE/hardware.json), so every run
    here — a resumed one included — computes attention the same way."""
    from kiln.planning.cpu_calibration import recall_choice, remember_choice

    shape = (batch, heads, seq, d_head)
    entry = recall_choice("cpu-attention", shape)
    if entry is not None and entry.get("path") in ("sdpa", "matmul"):
        return entry["path"] == "matmul", f"as measured earlier on this machine: {entry.get('why')}"
    matmul, times = choose_cpu_attention(*shape)
    why = " < ".join(f"{k} {times[k] * 1e3:.1f} ms" for k in sorted(times, key=times.get))
    why += " per layer fwd+bwd"
    remember_choice("cpu-attention", shape, {"path": "matmul" if matmul else "sdpa", "why": why})
    return matmul, why + ", measured now"


def apply_cpu_attention(
    model: nn.Module, mode: str, batch: int, seq: int, precision: str, device: str
) -> str:
    """Apply ``train.cpu_attention`` (``auto`` / ``sdpa`` / ``matmul``) to ``model``'s attention
    layers; returns what was done. Only causal bf16 self-attention on CPU of up to
    MATMUL_ATTENTION_MAX_LEN tokens has a choice; everything else always runs SDPA."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    gqa = bool(layers) and layers[0].n_kv_heads != layers[0].n_heads
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if not layers or not uses_matmul_attention(device, dtype, seq, gqa):
        return "attention: SDPA (no choice for this device, precision, length or GQA)"
    why = f"train.cpu_attention is {mode!r}"
    matmul = mode == "matmul"
    if mode == "auto":
        matmul, why = _auto_choice(batch, layers[0].n_heads, seq, layers[0].d_head)
    for layer in layers:
        layer.matmul_attention = matmul
    chosen = "matmul path (bf16 matmuls, fp32 softmax)" if matmul else "SDPA flash kernel"
    log.info("cpu attention choice: %s (%s)", chosen, why)
    return f"attention: {chosen} ({why})"
