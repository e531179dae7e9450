"""Keep freed memory inside the process (Linux, glibc), so each step does not page-fault it in.

glibc's malloc serves every block over 32 MB (the most its dynamic threshold ever grows to)
with a fresh ``mmap`` and returns it to the kernel on ``free``. A CPU training step allocates
and frees dozens of such tensors — the bf16 copy of the embedding table, its gradient, the
logit gradient of the fused loss, the packed sparse-kernel operands — so every step the kernel
zero-fills those pages again, at well under 1 GB/s on a virtual machine. Measured on the
2-core dev VM, cerebras-gpt-111m, 2048 tokens, eager bf16 (benchmarks/sparse_train_step.py with
and without ``--no-malloc-tuning``, medians of separate runs): 3.5 s → 2.8 s per dense step and
2.6 s → 1.7 s per 87.5%-sparse step, whose kernels allocate more short-lived dense-shaped
tensors.

:func:`keep_freed_memory` turns ``mmap`` off for malloc (large blocks come from the heap) and
never trims the heap, so after the first step the same memory is reused. The process then
keeps its peak heap until it exits — what a training process reaches anyway. This is the
effect the PyTorch CPU tuning guides get by preloading jemalloc or tcmalloc, without an extra
library. ``KILN_MALLOC_TUNING=0`` turns it off.

``KILN_MALLOC_TUNING=memory`` does the opposite, for a run that must stay under a memory cap:
every block over 128 KiB gets its own ``mmap`` and goes back to the kernel when freed (a fixed
threshold, so glibc never raises it), and the heap is trimmed. Slower steps (the page faults
above), but the peak tracks the live tensors: FSDP2 on CPU frees and re-allocates each block's
gathered parameters and gradients, and with the heap kept those blocks fragment it — measured
on 2 gloo ranks, 8 blocks of 3 MB, two steps: peak resident set +130 MB kept vs +63 MB with
``memory`` (benchmarks/memory_study.py uses it for every layout).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_SMALL = 128 * 1024
_DONE: bool | None = None
_RETURNING = False


def keep_freed_memory() -> bool:
    """Apply the tuning once per process; True when it is (or already was) in force."""
    global _DONE, _RETURNING
    if _DONE is not None:
        return _DONE
    _DONE = False
    mode = os.environ.get("KILN_MALLOC_TUNING", "1")
    if sys.platform != "linux" or mode == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    if mode == "memory":  # return large blocks at once: freed memory is NOT kept
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _SMALL) == 1
        _RETURNING = ok and libc.mallopt(_M_TRIM_THRESHOLD, _SMALL) == 1
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _DONE = bool(ok)
    return _DONE


def returns_freed_memory() -> bool:
    """True when ``KILN_MALLOC_TUNING=memory`` is in force (:func:`keep_freed_memory` applied
    it): large blocks go back to the kernel when freed."""
    return _RETURNING


def heap_is_kept() -> bool:
    """Whether ``kiln train`` on a CPU in this environment keeps freed memory in the heap (the
    memory estimate adds what such a heap holds beyond the live tensors): Linux, and
    ``KILN_MALLOC_TUNING`` other than ``memory`` (``0`` leaves glibc's defaults, whose heap
    also keeps its holes for blocks under the mmap threshold)."""
    return sys.platform == "linux" and os.environ.get("KILN_MALLOC_TUNING", "1") != "memory"
