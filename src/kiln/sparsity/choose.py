"""The per-layer kernel chooser: :func:`choose_kernel` times every candidate kernel of
kiln.sparsity.kernels — dense ones included — on the real shape, once per
shape/pattern/density/dtype/device, keeps the fastest and says what each took
(:func:`rank_candidates`, :func:`kernel_choice_reason`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kiln.errors import ConfigError
from kiln.sparsity.kernels import (
    BlockLayout,
    _semi_structured_linear,
    amx_extension,
    block_sparse_linear,
    cpp_extension,
    dense_linear,
    masked_linear,
    semi_structured_available,
)
from kiln.sparsity.patterns import block_mask, nm_mask, parse_pattern, unstructured_mask

log = logging.getLogger(__name__)

_CHOICES: dict[tuple, tuple[str, Callable, str]] = {}
_LAYOUTS: dict[tuple, BlockLayout] = {}


def _layout_for(mask: torch.Tensor, block_size: int) -> BlockLayout:
    key = (mask.data_ptr(), mask._version, tuple(mask.shape), block_size)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = BlockLayout.from_mask(mask, block_size)
    return _LAYOUTS[key]


def _block_kernel(block_size: int, backend: str) -> Callable:
    def fn(x, weight, bias, mask):
        return block_sparse_linear(x, weight, bias, _layout_for(mask, block_size), backend)

    return fn


def _time_candidate(name: str, fn, x, weight, bias, mask, reps: int) -> float:
    """Fastest of ``reps`` fwd + bwd runs of candidate ``name`` (after one warm-up, so each call
    measures it cache-warm; :func:`choose_kernel` calls it in rounds over the candidates). The
    ``dense`` candidate also pays the weight-gradient masking it costs a training step."""
    keep, mask_grad = mask.to(weight.dtype), name == "dense"
    times = []
    for i in range(reps + 1):
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        fn(xi, weight, bias, mask).sum().backward()
        if mask_grad:
            weight.grad.mul_(keep)
        if i:  # the first call warms up (and builds layouts)
            times.append(time.perf_counter() - start)
        weight.grad = bias.grad = None
    return min(times)  # noise on a shared machine only adds time: the fastest run is the cost


def rank_candidates(timings: dict[str, float]) -> tuple[str, str]:
    """(fastest candidate, reason listing every candidate with its time, fastest first).

    E.g. ``"block64-cpp 3.1 ms < dense 5.8 ms < masked-dense 6.3 ms < block64-torch 9.0 ms"``.
    Ties go to the candidate listed first (dense before masked-dense before sparse kernels, as
    :func:`choose_kernel` lists them), so a sparse kernel must be strictly faster to be chosen.
    """
    if not timings:
        raise ValueError("rank_candidates needs at least one timed candidate")
    order = sorted(timings, key=lambda n: timings[n])  # stable: ties keep the listing order
    reason = " < ".join(f"{n} {timings[n] * 1e3:.1f} ms" for n in order)
    return order[0], reason


def _candidates(pat, density: float, dtype: torch.dtype, device: torch.device, scores):
    """(name, fn, mask) for every kernel that can run this pattern in ``dtype`` on this device;
    the dense kernels first, so that on a tie the chooser keeps the simple path. The C++
    kernels compute in bf16, so an fp32 problem gets only the torch block kernel."""
    sparse: list[tuple[str, Callable, torch.Tensor]] = []
    if pat.kind == "block" and device.type == "cpu":
        sizes = [pat.block_size] if pat.block_size else [32, 64, 128]
        for b in sizes:
            mask = _try_block_mask(scores, density, b)
            if mask is None:
                continue
            if dtype == torch.bfloat16 and amx_extension() is not None:
                sparse.append((f"block{b}-amx", _block_kernel(b, "amx"), mask))
            if dtype == torch.bfloat16 and cpp_extension() is not None:
                sparse.append((f"block{b}-cpp", _block_kernel(b, "cpp"), mask))
            sparse.append((f"block{b}-torch", _block_kernel(b, "torch"), mask))
    if pat.kind == "nm" and (pat.n, pat.m) == (2, 4) and semi_structured_available(device):
        sparse.append(("semi-structured-2:4", _semi_structured_linear, nm_mask(scores, 2, 4)))
    mask = sparse[0][2] if sparse else unstructured_mask(scores, density)
    return [("dense", dense_linear, mask), ("masked-dense", masked_linear, mask), *sparse]


def choose_kernel(
    out_features: int,
    in_features: int,
    tokens: int,
    pattern: str,
    density: float,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    reps: int = 5,
) -> tuple[str, Callable]:
    """Pick the fastest fwd+bwd kernel ``fn(x, weight, bias, mask) -> y`` for this problem.

    Every candidate is timed on the real shape (on CPU in bf16 as a training step runs it:
    autocast over fp32 master weights) — ``dense`` (plain ``F.linear`` plus the weight gradient
    masking it needs), ``masked-dense``, and each sparse kernel the pattern and device allow —
    once per (shape, tokens, pattern, density, dtype, device), cached in-process. The fastest
    (of ``reps`` rounds over all candidates, so a burst of load on a shared machine hits every
    candidate alike) wins, so the chosen path is never slower than the dense layer as measured;
    the reason names every candidate with its time (see :func:`rank_candidates`), is logged, and is
    kept in :func:`kernel_choice_reason`.
    """
    pat = parse_pattern(pattern)
    device = torch.device(device)
    key = (out_features, in_features, tokens, pat.name, float(density), dtype, str(device))
    if key in _CHOICES:
        name, fn, _ = _CHOICES[key]
        return name, fn
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(out_features, in_features, generator=gen)
    candidates = _candidates(pat, density, dtype, device, scores)
    # On CPU a bf16 layer trains as Kiln runs it: fp32 master weights under bf16 autocast, so
    # each candidate pays its own casts (F.linear casts the whole weight, the C++ kernels read
    # only the kept blocks) and its fp32 weight gradient.
    master = torch.float32 if device.type == "cpu" else dtype
    x = torch.randn(tokens, in_features, generator=gen).to(device, master)
    weight = torch.randn(out_features, in_features, generator=gen).to(device, master)
    bias = torch.zeros(out_features, device=device, dtype=master)
    weight.requires_grad_(), bias.requires_grad_()
    timings: dict[str, float] = {}
    fns = {name: fn for name, fn, _ in candidates}
    masks = {name: mask.to(device) for name, _, mask in candidates}
    for _ in range(reps):  # rounds over the candidates: a burst of load hits them alike
        for name in [n for n in fns if n in masks]:
            try:
                with torch.autocast(device.type, dtype=dtype, enabled=master != dtype):
                    t = _time_candidate(name, fns[name], x, weight, bias, masks[name], 1)
                timings[name] = min(t, timings.get(name, t))
            except (RuntimeError, ConfigError) as err:
                log.info("choose_kernel: candidate %s failed: %s", name, err)
                del masks[name]  # not timed again
    name, reason = rank_candidates(timings)
    _CHOICES[key] = (name, fns[name], reason)
    log.info("choose_kernel %s: %s", key[:5], reason)
    return name, fns[name]


def kernel_choice_reason(out_features, in_features, tokens, pattern, density, dtype, device):
    """The logged reason for a cached :func:`choose_kernel` result (None if not chosen yet)."""
    pat = parse_pattern(pattern)
    key = (out_features, in_features, tokens, pat.name, float(density), dtype, str(device))
    return _CHOICES[key][2] if key in _CHOICES else None


def _try_block_mask(scores: torch.Tensor, density: float, b: int) -> torch.Tensor | None:
    """A balanced block mask along whichever axis allows this density exactly, else an
    unbalanced one (e.g. 768² at 87.5% with b = 64: 1.5 blocks per line), or None."""
    for axis in ("rows", "cols"):
        try:
            return block_mask(scores, density, b, balanced=True, axis=axis)
        except ConfigError:
            continue
    try:
        return block_mask(scores, density, b, balanced=False)
    except ConfigError:
        return None
