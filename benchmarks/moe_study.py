"""Quality of mixture-of-experts training at equal active FLOPs and equal tokens: dense vs 8
experts top-1 (Switch), top-2, and top-1 with a shared expert, on the built-in corpus; plus the
expert load balance over training under the Switch auxiliary loss, the auxiliary-loss-free
expert bias (DeepSeek-V3) and no balancing at all.

Every run is a real ``kiln train`` subprocess with the same attention, embeddings, data, steps
and seeds; only the ``--moe.*`` flags differ. Equal active FLOPs: the dense MLP has width f;
top-1 uses experts of width f, top-2 experts of width f/2, and the shared variant one routed
expert of width f/2 plus a shared MLP of width f/2, so every token multiplies with an MLP of
total width f (plus the router's 8·d, 0.1% of the step). Each variant runs with seeds
0..N-1 (``--train.seed``: initialisation and data order). Results go to docs/moe-study.md and
the figure docs/moe-study.png; a summary section to BENCHMARKS.md.

    .venv/bin/python benchmarks/moe_study.py --steps 300 --seeds 3 --jobs 3
    .venv/bin/python benchmarks/moe_study.py --reuse      # only run what is missing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, mean_sd, replace_section, train_run  # noqa: E402

D_MODEL, D_FFN, LAYERS, BATCH, SEQ = 64, 256, 2, 16, 64
BASE = [
    "--data.corpus", "builtin:shakespeare", "--data.vocab_size", "1024",
    "--data.seq_len", str(SEQ), "--model.preset", "tiny", "--model.n_layers", str(LAYERS),
    "--model.d_model", str(D_MODEL), "--model.n_heads", "2", "--model.d_ffn", str(D_FFN),
    "--model.max_seq_len", str(SEQ), "--train.batch_size", str(BATCH), "--train.lr", "3e-3",
    "--train.precision", "fp32", "--train.eval_every", "50", "--train.eval_batches", "16",
    "--checkpoint.every", "0", "--log.every", "10", "--log.progress", "false",
    "--log.tensorboard", "false", "--run.overwrite", "true",
]  # fmt: skip
MOE = ["--moe.experts", "8", "--moe.aux_loss_coef", "0.01"]
HALF = str(D_FFN // 2)
VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "top1": [*MOE, "--moe.top_k", "1"],
    "top2": [*MOE, "--moe.top_k", "2", "--moe.d_expert", HALF],
    "top1+shared": [*MOE, "--moe.top_k", "1", "--moe.d_expert", HALF,
                    "--moe.shared_experts", "1"],
}  # fmt: skip
"""Name → extra flags of the quality comparison (every seed)."""
BALANCE = {
    "top1-bias": ["--moe.experts", "8", "--moe.top_k", "1", "--moe.aux_loss_coef", "0",
                  "--moe.bias_update_rate", "0.001"],
    "top1-none": ["--moe.experts", "8", "--moe.top_k", "1", "--moe.aux_loss_coef", "0"],
}  # fmt: skip
"""The balancing comparison against top1 (Switch aux loss): the auxiliary-loss-free expert
bias, and no balancing at all; seed 0 only (the study has to fit a shared 2-core machine)."""


def run_one(name: str, flags: list[str], root: Path, steps: int, seed: int, reuse: bool) -> dict:
    """One ``kiln train`` run (or its earlier result): summary, val curve, load imbalance."""
    args = [*BASE, "--train.max_steps", str(steps), "--train.seed", str(seed), *flags]
    result, records = train_run(root / f"seed{seed}" / name, args, f"{name} seed {seed}", reuse)
    result["curve"] = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    result["imbalance"] = [(r["step"], imbalance(r)) for r in records if "moe_load_mean.0" in r]
    result["aux"] = [(r["step"], r["moe_aux_loss"]) for r in records if "moe_aux_loss" in r]
    return result


def imbalance(record: dict) -> float:
    """max/mean tokens per expert (per step, averaged over the log window), mean over layers."""
    layers = [k.split(".", 1)[1] for k in record if k.startswith("moe_load_max.")]
    return statistics.fmean(
        record[f"moe_load_max.{i}"] / record[f"moe_load_mean.{i}"] for i in layers
    )


def finals(results: dict[str, list[dict]], name: str) -> list[float]:
    return [r["final_val_loss"] for r in results[name]]


def late_imbalance(result: dict) -> float:
    """Mean max/mean load over the second half of training."""
    points = result["imbalance"]
    half = points[-1][0] / 2
    return statistics.fmean(v for s, v in points if s > half)


COLORS = {"dense": "black", "top1": "tab:blue", "top2": "tab:orange", "top1+shared": "tab:green",
          "top1-bias": "tab:purple", "top1-none": "tab:red"}  # fmt: skip


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, per_seed in results.items():
        if name in BALANCE:
            continue
        steps = [s for s, _ in per_seed[0]["curve"]]
        mean = [statistics.fmean(r["curve"][i][1] for r in per_seed) for i in range(len(steps))]
        ax1.plot(steps, mean, color=COLORS[name], label=name, marker=".")
    ax1.set(xlabel="step", ylabel="validation loss", title="validation loss (mean over seeds)")
    ax1.set_ylim(top=min(r["curve"][0][1] for rs in results.values() for r in rs) + 0.1)
    ax1.legend(fontsize=8)
    names = [n for n in results if n not in BALANCE]
    stats = [mean_sd(finals(results, n)) for n in names]
    ax2.bar(range(len(names)), [m for m, _ in stats], yerr=[sd for _, sd in stats], capsize=4,
            color=[COLORS[n] for n in names])  # fmt: skip
    low = min(m - sd for m, sd in stats)
    high = max(m + sd for m, sd in stats)
    ax2.set_ylim(low - (high - low), high + 0.5 * (high - low))
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    seeds = len(results["dense"])
    ax2.set(ylabel="final validation loss", title=f"final val loss, mean ± sd, {seeds} seeds")
    for name in ("top1", "top1-bias", "top1-none"):
        if name in results:
            steps, values = zip(*results[name][0]["imbalance"])
            ax3.plot(steps, values, color=COLORS[name], label=name)
    ax3.axhline(1.0, color="gray", linestyle=":")
    ax3.set(xlabel="step", ylabel="max / mean tokens per expert",
            title="expert load, top-1 (seed 0, mean over layers)")  # fmt: skip
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table: parameters, FLOPs, final loss (and its paired Δ to dense), load."""
    seeds = len(results["dense"])
    rows = [f"| run | params total / active | train FLOPs per token | final val loss (mean ± sd, "
            f"{seeds} seeds) | Δ vs dense, same seed | max/mean expert load, 2nd half | "
            "wall-clock (s, mean) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    dense = finals(results, "dense")
    for name, per_seed in results.items():
        first, losses = per_seed[0], finals(results, name)
        loss_mean, loss_sd = mean_sd(losses)
        delta_mean, delta_sd = mean_sd([a - b for a, b in zip(losses, dense)])
        load = mean_sd([late_imbalance(r) for r in per_seed]) if first["imbalance"] else None
        one = len(losses) == 1
        loss_text = f"{loss_mean:.4f}" + (" (seed 0)" if one else f" ± {loss_sd:.4f}")
        delta_text = f"{delta_mean:+.4f}" + (" (seed 0)" if one else f" ± {delta_sd:.4f}")
        load_text = "—" if load is None else f"{load[0]:.2f}" + ("" if one else f" ± {load[1]:.2f}")
        rows.append(
            f"| {name} | {first['params'] / 1e6:.3f}M / "
            f"{first.get('active_params', first['params']) / 1e6:.3f}M | "
            f"{first['flops'] / first['tokens'] / 1e6:.2f}M | {loss_text} | {delta_text} | "
            f"{load_text} | "
            f"{statistics.fmean(r['wall_s'] for r in per_seed):.0f} |"
        )
    return "\n".join(rows)


def write_doc(results: dict[str, list[dict]], steps: int, command: str, date: str) -> None:
    seeds = len(results["dense"])
    per_seed = "; ".join(
        f"{n}: " + ", ".join(f"{x:.4f}" for x in finals(results, n)) for n in results
    )
    text = f"""# Mixture-of-experts quality study

Dense vs mixture-of-experts MLPs at **equal active FLOPs per token and equal tokens**
({steps} steps × {BATCH} × {SEQ} tokens) on the built-in Shakespeare corpus, each with {seeds}
seed(s) (`--train.seed` 0..{seeds - 1}: initialisation and data order). Model: {LAYERS} blocks,
d_model {D_MODEL}, 2 heads, BPE vocabulary 1024, fp32, every MLP replaced by the MoE layer
(8 experts, dropless, softmax router). Widths: dense MLP {D_FFN}; top-1 experts {D_FFN};
top-2 experts {HALF}; top-1+shared one routed expert of {HALF} plus a shared MLP of {HALF}:
every token multiplies with an MLP of total width {D_FFN}, and the router adds 8·{D_MODEL}
weights per layer (the FLOPs column, `kiln train`'s model FLOPs on active parameters, shows the
difference). Balancing: the Switch auxiliary loss (α = 0.01) for top1 / top2 / top1+shared;
`top1-bias` replaces it by the auxiliary-loss-free expert bias (γ = 0.001 per step) and
`top1-none` has neither; these two ran with seed 0 only, to fit the time this machine had.
The Δ column pairs each run with the dense run of the same seed. The load column is the
tokens routed to the busiest expert over the mean (1 = perfectly balanced, 8 = everything on
one expert), per step, averaged over layers and over the second half of training.

{table(results)}

Per seed: {per_seed}.

READING

![MoE study](moe-study.png)

Command (regenerates this page and the figure; the reading above is written by hand):

    {command}

Machine: {machine().replace(" (1 threads)", "")}; runs in parallel, one thread each<br>
Date: {date}
"""
    (ROOT / "docs" / "moe-study.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--jobs", type=int, default=3, help="runs at the same time")
    parser.add_argument("--out", default="runs/moe-study")
    parser.add_argument("--reuse", action="store_true", help="skip runs that already finished")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # several runs share the cores: no oversubscription
    root = ROOT / args.out
    todo = [(n, f, s) for n, f in VARIANTS.items() for s in range(args.seeds)]
    todo += [(n, f, 0) for n, f in BALANCE.items()]
    wanted = set(filter(None, args.only.split(",")))
    todo = [t for t in todo if not wanted or t[0] in wanted]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [(n, pool.submit(run_one, n, f, root, args.steps, s, args.reuse))
                   for n, f, s in todo]  # fmt: skip
        results: dict[str, list[dict]] = {}
        for name, fut in futures:
            results.setdefault(name, []).append(fut.result())
    total = time.perf_counter() - start
    if wanted:
        return
    (ROOT / "docs").mkdir(exist_ok=True)
    plot(results, ROOT / "docs" / "moe-study.png")
    command = (
        f".venv/bin/python benchmarks/moe_study.py --steps {args.steps} "
        f"--seeds {args.seeds} --jobs {args.jobs}"
    )
    import datetime

    date = datetime.date.today().isoformat()
    write_doc(results, args.steps, command, date)
    body = (
        "### MoE quality study (equal active FLOPs, equal tokens)\n\n"
        f"{table(results)}\n\nFull setup, figure and reading: docs/moe-study.md. "
        f"{len(todo)} runs, {sum(r['wall_s'] for rs in results.values() for r in rs) / 60:.0f} "
        f"min of training wall-clock in all (this call: {total / 60:.1f} min, {args.jobs} runs "
        "at a time).\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {date}"
    )
    replace_section("moe-study", body)
    print((ROOT / "docs" / "moe-study.md").read_text())


if __name__ == "__main__":
    main()
