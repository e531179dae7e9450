"""Kiln's layout planner against published large training runs (docs/planner.md).

For each run: the model shape, cluster and layout the paper reports, Kiln's predicted step
time for that layout (kiln.planning.layout.predict_layout), the step time the paper's
throughput implies, and the layout Kiln itself recommends on that cluster.

Both Megatron papers count FLOPs with full activation recomputation (four passes):
F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) per step (Narayanan et al. 2021, eq. 3), so the
published step time is F / (achieved FLOP/s per GPU × GPUs). The numbers below are typed in
from memory of the papers (see docs/planner.md); no network access was available to re-check.

    PYTHONPATH=src python benchmarks/planner_published.py [--recommend]
"""

from __future__ import annotations

import argparse

from kiln.planning.flops import Shape
from kiln.planning.layout import Layout, make_cluster, predict_layout, recommend

SEQ, VOCAB = 2048, 51200
# (label, heads, hidden, layers, tp, pp, gpus, batch, TFLOP/s per GPU achieved, source)
RUNS = [
    ("GPT 1.7B", 24, 2304, 24, 1, 1, 32, 512, 137, "Narayanan et al. 2021, Table 1"),
    ("GPT 7.5B", 32, 4096, 36, 4, 1, 128, 512, 142, "Narayanan et al. 2021, Table 1"),
    ("GPT 18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135, "Narayanan et al. 2021, Table 1"),
    ("GPT 39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138, "Narayanan et al. 2021, Table 1"),
    ("GPT 145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148, "Narayanan et al. 2021, Table 1"),
    ("GPT 529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163, "Narayanan et al. 2021, Table 1"),
    ("GPT 1008B", 160, 25600, 128, 8, 64, 3072, 3072, 163, "Narayanan et al. 2021, Table 1"),
    ("MT-NLG 530B", 128, 20480, 105, 8, 35, 2240, 1920, 126, "Smith et al. 2022, Table 1"),
    ("MT-NLG 530B", 128, 20480, 105, 8, 35, 3360, 1920, 113, "Smith et al. 2022, Table 1"),
]


def megatron_flops(batch: int, layers: int, hidden: int) -> float:
    """Narayanan et al. 2021, eq. 3 (with activation recomputation)."""
    h, s, v, n = hidden, SEQ, VOCAB, layers
    return 96 * batch * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recommend", action="store_true", help="also run Kiln's recommendation")
    args = ap.parse_args()
    print("| run | GPUs | layout | published step s | Kiln step s | error | Kiln's pick |")
    print("|---|---|---|---|---|---|---|")
    for label, heads, h, n, tp, pp, gpus, batch, tflops, _ in RUNS:
        shape = Shape(n, h, heads, 4 * h, VOCAB, SEQ)
        cluster = make_cluster("A100", gpus // 8, 8)
        dp = gpus // (tp * pp)
        m = batch // dp
        lay = Layout(tp, pp, dp, 1, 1, m, "1F1B", 1, True, "ddp")
        pred = predict_layout(shape, lay, cluster, SEQ)
        published = megatron_flops(batch, n, h) / (tflops * 1e12 * gpus)
        err = pred.step_s / published - 1
        pick = "-"
        if args.recommend:
            best = recommend(shape, cluster, batch, SEQ, top=1, tied_pp=True)[0]
            gain = pred.step_s / best.step_s - 1
            same = (best.layout.tp, best.layout.pp) == (tp, pp)
            pick = f"{best.layout.name()} ({'same TP/PP' if same else f'{gain:+.0%} faster'})"
        fit = "" if pred.fits else " (does not fit)"
        print(f"| {label} | {gpus} | TP{tp} PP{pp} DP{dp} 1F1B m{m} +AC{fit} | {published:.2f} "
              f"| {pred.step_s:.2f} | {err:+.0%} | {pick} |")  # fmt: skip


if __name__ == "__main__":
    main()
