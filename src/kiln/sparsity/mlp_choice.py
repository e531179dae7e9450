"""The GELU MLP as one timed choice: its linears' own kernels, or the fused block-sparse MLP.

:func:`kiln.sparsity.choose.choose_kernel` picks each linear's kernel alone. The fused
fc1 → exact GELU → fc2 kernel (:func:`kiln.sparsity.kernels.block_sparse_mlp`) is a candidate
for the pair only, so :func:`choose_mlp` times it against the pair as the linears chose (and
against the plain dense pair) on the real shape, forward + backward, with the weight-gradient
masking each dense path costs a step; the fastest wins and the reason names every candidate with
its time, fastest first. A fused win makes both linears use that block kernel: the fused MLP
runs only when its linears really use the block kernel, and only where it was measured fastest.
Timed once per (shapes, tokens, densities, block, kernels, dtype) and cached in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln.errors import ConfigError
from kiln.sparsity import choose, kernels
from kiln.sparsity.choose import rank_candidates
from kiln.sparsity.kernels import BlockLayout

log = logging.getLogger(__name__)

__all__ = ["PER_LINEAR", "choose_mlp", "fused_backends"]

PER_LINEAR = "per-linear"
"""The choice that keeps each linear's own kernel (no fusion)."""

_CHOICES: dict[tuple, tuple[str, str]] = {}


def fused_backends() -> list[str]:
    """Block backends with a fused MLP kernel on this machine, the preferred one first."""
    found = []
    if kernels.amx_extension() is not None:
        found.append("amx")
    if kernels.cpp_extension() is not None:
        found.append("cpp")
    return found


def _linear_fn(kernel: str, block: int) -> Callable:
    """fn(x, weight, bias, mask) for a per-linear kernel name (as SparseLinear runs it)."""
    if kernel.startswith("block-"):
        return choose._block_kernel(block, kernel.split("-", 1)[1])
    return kernels.masked_linear if kernel == "masked" else kernels.dense_linear


def _time(run: Callable[[], torch.Tensor], after: Callable[[], None], reps: int) -> float:
    """Fastest of ``reps`` runs of ``run().sum().backward(); after()`` (after one warm-up, so
    each call measures the candidate cache-warm; :func:`choose_mlp` calls it in rounds)."""
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        run().sum().backward()
        after()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)  # noise on a shared machine only adds time


def _time_mlp_candidate(name: str, problem: dict, reps: int) -> float:
    """Forward + backward of candidate ``name`` on ``problem`` (see :func:`choose_mlp`) under
    bf16 autocast over fp32 weights, as a training step runs it."""
    x, (w1, b1, m1), (w2, b2, m2) = problem["x"], problem["fc1"], problem["fc2"]
    block = problem["block"]
    params = (w1, b1, w2, b2)
    if name.startswith("fused-"):
        lay1, lay2 = (BlockLayout.from_mask(m, block) for m in (m1, m2))
        backend = name.split("-", 1)[1]

        def run():
            return kernels.block_sparse_mlp(x, w1, b1, w2, b2, lay1, lay2, backend)

        masked_by_kernel = (True, True)
    else:
        k1, k2 = problem["kernels"] if name != "dense" else ("dense", "dense")
        f1, f2 = _linear_fn(k1, block), _linear_fn(k2, block)

        def run():
            return f2(F.gelu(f1(x, w1, b1, m1)), w2, b2, m2)

        masked_by_kernel = (k1 != "dense", k2 != "dense")
    keeps = [m.to(w.dtype) for m, w, done in zip((m1, m2), (w1, w2), masked_by_kernel) if not done]
    grads = [w for w, done in zip((w1, w2), masked_by_kernel) if not done]

    def after():
        if grads:
            torch._foreach_mul_([w.grad for w in grads], keeps)  # the callback's masking
        for p in params:
            p.grad = None

    with torch.autocast(problem["device"].type, dtype=torch.bfloat16):
        return _time(run, after, reps)


def choose_mlp(
    d_model: int,
    hidden: int,
    tokens: int,
    block: int,
    densities: tuple[float, float],
    per_linear: tuple[str, str],
    device: str | torch.device = "cpu",
    reps: int = 3,
) -> tuple[str, str]:
    """(choice, reason) for a bf16 GELU MLP ``[hidden, d_model]`` → ``[d_model, hidden]`` whose
    linears chose ``per_linear`` kernels: ``"per-linear"`` (keep them), ``"dense"`` (both
    linears dense: the plain pair was faster than their own choices) or ``"fused-<backend>"``.

    Candidates: ``dense`` (both linears plain ``F.linear``), the pair as chosen (named
    ``per-linear(k1, k2)``; left out when both chose dense, which is the same thing), and
    ``fused-<backend>`` for each backend of :func:`fused_backends`. Ties keep the unfused paths.
    """
    device = torch.device(device)
    key = (d_model, hidden, tokens, block, densities, per_linear, str(device))
    if key in _CHOICES:
        return _CHOICES[key]
    gen = torch.Generator().manual_seed(0)
    problem: dict = {"block": block, "kernels": per_linear, "device": device}
    problem["x"] = torch.randn(tokens, d_model, generator=gen).to(device)
    for name, (out_f, in_f), density in zip(
        ("fc1", "fc2"), ((hidden, d_model), (d_model, hidden)), densities
    ):
        mask = choose._try_block_mask(torch.rand(out_f, in_f, generator=gen), density, block)
        if mask is None:
            raise ValueError(f"no {block}x{block} block mask of [{out_f}, {in_f}] at {density}")
        weight = (torch.randn(out_f, in_f, generator=gen) * 0.02 * mask).to(device)
        bias = torch.zeros(out_f, device=device)
        problem[name] = (weight.requires_grad_(), bias.requires_grad_(), mask.to(device))
    pair = f"{PER_LINEAR}({per_linear[0]}, {per_linear[1]})"
    names = ["dense"] + ([pair] if per_linear != ("dense", "dense") else [])
    names += [f"fused-{b}" for b in fused_backends()]
    timings: dict[str, float] = {}
    for _ in range(reps):  # rounds over the candidates: a burst of load hits them alike
        for name in list(names):
            try:
                t = _time_mlp_candidate(name, problem, 1)
                timings[name] = min(t, timings.get(name, t))
            except (RuntimeError, ConfigError) as err:
                log.info("choose_mlp: candidate %s failed: %s", name, err)
                names.remove(name)
    best, reason = rank_candidates(timings)
    choice = PER_LINEAR if best.startswith(PER_LINEAR) else best
    if choice == "dense" and per_linear == ("dense", "dense"):
        choice = PER_LINEAR  # the same path
    _CHOICES[key] = (choice, reason)
    return choice, reason
