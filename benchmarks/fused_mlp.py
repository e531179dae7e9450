"""Fused (token-tiled, recomputing) dense GELU MLP vs unfused eager vs torch.compile, fwd+bwd.

    .venv/bin/python benchmarks/fused_mlp.py [--tokens 2048 --d 768 --ffn 3072 --rounds 5]

The cerebras-gpt-111m MLP shape (d 768, d_ffn 3072) on 2048 tokens, fp32. The candidates run
interleaved, round after round, and each keeps its fastest round (load only adds time), so the
ratios are side by side. Also prints what the performance model (``kiln.planning.perf``, this
machine's calibration) predicts for the unfused and the fused MLP. The process sets malloc and
its thread count as ``kiln train`` does (kiln.train.malloc). Writes the ``fused_mlp`` section
of BENCHMARKS.md with ``--write`` (another with ``--section``, e.g. one per CPU kind).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from common import write_section
from kiln.models.fused_mlp import tiled_mlp
from kiln.planning.hardware import cpu_matrix_flags
from kiln.train.malloc import keep_freed_memory


def _timer(fn, x, params):
    def run() -> float:
        start = time.perf_counter()
        y = fn(x)
        torch.autograd.grad(y, (x, *params), torch.ones_like(y))
        return time.perf_counter() - start

    return run


def measure(tokens: int, d: int, f: int, tiles: list[int], rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=gen).requires_grad_()
    w1 = (torch.randn(f, d, generator=gen) * 0.02).requires_grad_()
    w2 = (torch.randn(d, f, generator=gen) * 0.02).requires_grad_()
    b1, b2 = torch.zeros(f, requires_grad=True), torch.zeros(d, requires_grad=True)
    params = (w1, b1, w2, b2)

    def unfused(t):
        return F.linear(F.gelu(F.linear(t, w1, b1)), w2, b2)

    runs = {"unfused eager": _timer(unfused, x, params)}
    runs["unfused torch.compile"] = _timer(torch.compile(unfused), x, params)
    for tile in tiles:
        fn = lambda t, tile=tile: tiled_mlp(t, w1, b1, w2, b2, "none", tile)  # noqa: E731
        runs[f"fused, tile {tile}"] = _timer(fn, x, params)
    for run in runs.values():  # warm-up (and compile)
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def predicted(tokens: int, d: int, f: int, tile: int) -> tuple[float, float]:
    """(unfused, fused) fwd+bwd seconds the perf model predicts, calibrated in this run as
    benchmarks/perf_vs_measured.py does (refined model: element-wise kernels fitted at this
    MLP's sizes)."""
    from kiln.planning.perf import predict_mlp
    from perf_vs_measured import calibrate

    _, dev = calibrate("fp32", tokens, d, f)
    return predict_mlp(tokens, d, f, None, dev), predict_mlp(tokens, d, f, tile, dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--tiles", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--section", default="fused_mlp", help="BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as kiln train pins it
    kept = keep_freed_memory()
    load_before = os.getloadavg()[0]
    best = measure(args.tokens, args.d, args.ffn, args.tiles, args.rounds)
    base = best["unfused eager"]
    flops = 6 * 2 * args.tokens * args.d * args.ffn  # fwd+bwd of two GEMMs, no recompute
    lines = [
        "| path | fwd+bwd ms | vs unfused eager | GFLOP/s (6·2·T·d·f) |",
        "|---|---:|---:|---:|",
    ]
    for name, sec in best.items():
        lines.append(f"| {name} | {sec * 1e3:.1f} | {base / sec:.2f}× | {flops / sec / 1e9:.0f} |")
    table = "\n".join(lines)
    print(table)
    tile = args.tiles[len(args.tiles) // 2]
    pred = predicted(args.tokens, args.d, args.ffn, tile)
    measured_tile = best[f"fused, tile {tile}"]
    model_line = (
        f"\n\nPerformance model (`kiln.planning.perf.mlp_costs`, calibrated in this run): "
        f"unfused {pred[0] * 1e3:.1f} ms (measured {base * 1e3:.1f}, "
        f"{(pred[0] - base) / base:+.0%}), fused tile {tile} {pred[1] * 1e3:.1f} ms (measured "
        f"{measured_tile * 1e3:.1f}, {(pred[1] - measured_tile) / measured_tile:+.0%}); "
        f"predicted fused speed-up {pred[0] / pred[1]:.2f}×, measured {base / measured_tile:.2f}×."
    )
    print(model_line.strip())
    if args.write:
        body = (
            f"## Fused dense MLP (token-tiled GEMM → GELU → GEMM, recomputing backward), fp32\n\n"
            f"cerebras-gpt-111m MLP shape: d {args.d}, d_ffn {args.ffn}, {args.tokens} tokens, "
            f"fwd+bwd (grads of x, W1, b1, W2, b2), fastest of {args.rounds} interleaved "
            f"rounds; CPU matrix instructions: {cpu_matrix_flags()}; malloc "
            f"{'keeping freed memory as kiln train does' if kept else 'at glibc defaults'}; "
            f"loadavg {load_before:.2f} before, {os.getloadavg()[0]:.2f} after."
            f"\n\n{table}{model_line}"
        )
        write_section(args.section, body)


if __name__ == "__main__":
    main()
