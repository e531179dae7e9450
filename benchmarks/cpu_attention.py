"""Side by side: causal attention forward + backward in bf16 on CPU, torch's flash kernel
(scaled_dot_product_attention) vs kiln.models.gpt.attention's matmul path, at the attention
shape of cerebras-gpt-111m (B=4, H=12, T=512, d_head=64), with each one's largest error
against an fp32 reference (output and the three input gradients, relative to the largest
reference value). Alternating rounds, best of each, so machine noise hits both alike.

    .venv/bin/python benchmarks/cpu_attention.py        # writes its BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402
from kiln.models.gpt import attention  # noqa: E402
from kiln.planning.hardware import cpu_matrix_flags  # noqa: E402
from kiln.train.malloc import keep_freed_memory  # noqa: E402


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want).abs().max() / want.abs().max())


def flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def kiln(q, k, v):
    return attention(q, k, v, None, True, None, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--section", default="cpu_attention", help="BENCHMARKS.md section")
    args = parser.parse_args()
    keep_freed_memory()
    load = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.d_head)
    q32, k32, v32, g32 = (torch.randn(*shape, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True)
    ref.backward(g32)
    want = [ref.detach(), *(t.grad for t in leaves)]
    impls = {"torch flash (scaled_dot_product_attention)": flash, "kiln matmul path": kiln}
    inputs = {name: [t.bfloat16().requires_grad_() for t in (q32, k32, v32)] for name in impls}
    g = g32.bfloat16()
    errors = {}
    for name, fn in impls.items():
        y = fn(*inputs[name])
        y.backward(g)
        got = [y, *(t.grad for t in inputs[name])]
        errors[name] = [rel_error(a, b) for a, b in zip(got, want)]

    def step(name):
        for t in inputs[name]:
            t.grad = None
        start = time.perf_counter()
        impls[name](*inputs[name]).backward(g)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in impls}
    for name in impls:
        step(name)
    for _ in range(args.rounds):
        for name in impls:
            times[name].append(step(name))
    flops = 4 * args.batch * args.heads * args.seq**2 * args.d_head * 3.5 / 2  # causal half
    base = min(times["torch flash (scaled_dot_product_attention)"])
    rows = [
        "| implementation | fwd+bwd ms (best) | speed-up | GFLOP/s (causal FLOPs) | "
        "rel. error y / dq / dk / dv vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for name in impls:
        best = min(times[name])
        errs = " / ".join(f"{e:.4f}" for e in errors[name])
        rows.append(
            f"| {name} | {best * 1e3:.1f} | {base / best:.2f}× | {flops / best / 1e9:.0f} | "
            f"{errs} |"
        )
    body = (
        f"## Causal attention on CPU, bf16 (B={args.batch}, H={args.heads}, T={args.seq}, "
        f"d_head={args.d_head})\n\n"
        f"Forward + backward, best of {args.rounds} alternating rounds on "
        f"{torch.get_num_threads()} threads, CPU with {cpu_matrix_flags()}, loadavg "
        f"{load:.2f} before, {os.getloadavg()[0]:.2f} after. `kiln train` times both at start "
        f"(`train.cpu_attention: auto`) and takes the faster for causal bf16 attention on CPU "
        f"up to 1024 tokens. The matmul path keeps the bf16 probabilities "
        f"({2 * args.heads * args.seq**2 / 2**20:.0f} MiB per sequence per layer here) for "
        f"backward, which the flash kernel recomputes.\n\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
