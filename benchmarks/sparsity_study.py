"""Quality of sparse training at equal tokens: dense vs static / GMP / RigL at 50, 75 and 87.5%
sparsity, plus SPDF (75% sparse, dense for the last 25% of steps), on the built-in corpus.

Every run is a real ``kiln train`` subprocess with the same model, data, steps and seed; only
the ``--sparsity.*`` flags differ. With ``--seeds N`` every variant runs with seeds 0..N-1
(``--train.seed``: initialisation, masks and data order), and the table gives the mean and
standard deviation of the final validation loss and of its paired difference to the dense run
of the same seed. Results (final validation loss, wall-clock) go to docs/sparsity-study.md with
a plot of the validation curves, docs/sparsity-study.png.

    .venv/bin/python benchmarks/sparsity_study.py --steps 1000 --seeds 3 --jobs 2
    .venv/bin/python benchmarks/sparsity_study.py --reuse      # only run what is missing
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, mean_sd, train_run  # noqa: E402

BASE = [
    "--data.corpus", "builtin:shakespeare", "--data.vocab_size", "1024", "--data.seq_len", "64",
    "--model.preset", "tiny", "--model.n_layers", "2", "--model.d_model", "128",
    "--model.n_heads", "2", "--model.d_ffn", "512", "--model.max_seq_len", "64",
    "--train.batch_size", "8", "--train.lr", "3e-3", "--train.precision", "fp32",
    "--train.eval_every", "20", "--train.eval_batches", "8", "--checkpoint.every", "0",
    "--log.every", "20", "--log.progress", "false", "--log.tensorboard", "false",
    "--run.overwrite", "true",
]  # fmt: skip
SPARSE = ["--sparsity.pattern", "block", "--sparsity.block_size", "16", "--sparsity.update_every",
          "10"]  # fmt: skip


def runs() -> list[tuple[str, list[str]]]:
    """(name, extra flags) of every run in the study."""
    out = [("dense", [])]
    for algo in ("static", "gmp", "rigl"):
        for level in ("0.5", "0.75", "0.875"):
            out.append((f"{algo}-{level}", [*SPARSE, "--sparsity.level", level,
                                            "--sparsity.algorithm", algo]))  # fmt: skip
    out.append(("spdf-0.75", [*SPARSE, "--sparsity.level", "0.75", "--sparsity.algorithm", "spdf"]))
    return out


def run_one(name: str, flags: list[str], root: Path, steps: int, seed: int, reuse: bool) -> dict:
    args = [*BASE, "--train.max_steps", str(steps), "--train.seed", str(seed), *flags]
    result, records = train_run(root / f"seed{seed}" / name, args, f"{name} seed {seed}", reuse)
    result["curve"] = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    result["sparsity"] = records[-1].get("sparsity", 0.0)
    result["flops_ratio"] = records[-1].get("flops_per_token_sparse", 1) / records[-1].get(
        "flops_per_token_dense", 1
    )
    return result


def finals(results: dict[str, list[dict]], name: str) -> list[float]:
    return [r["final_val_loss"] for r in results[name]]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"dense": "black", "static": "tab:blue", "gmp": "tab:orange", "rigl": "tab:green",
              "spdf": "tab:red"}  # fmt: skip
    styles = {"0.5": ":", "0.75": "--", "0.875": "-"}
    for name, per_seed in results.items():
        algo, _, level = name.partition("-")
        steps, losses = zip(*per_seed[0]["curve"])  # seed 0
        ax1.plot(steps, losses, color=colors[algo], linestyle=styles.get(level, "-"), label=name)
    ax1.set(xlabel="step", ylabel="validation loss", title="validation loss (seed 0)")
    ax1.legend(fontsize=7, ncol=2)
    levels = ("0.5", "0.75", "0.875")
    for i, algo in enumerate(("static", "gmp", "rigl")):
        stats = [mean_sd(finals(results, f"{algo}-{x}")) for x in levels]
        xs = [float(x) + (i - 1) * 0.01 for x in levels]  # side by side, error bars visible
        ax2.errorbar(xs, [m for m, _ in stats], yerr=[sd for _, sd in stats], fmt="o-",
                     color=colors[algo], capsize=3, label=algo)  # fmt: skip
    dense_mean, dense_sd = mean_sd(finals(results, "dense"))
    ax2.axhline(dense_mean, color="black", linestyle="--", label="dense (mean)")
    ax2.axhspan(dense_mean - dense_sd, dense_mean + dense_sd, color="black", alpha=0.08)
    spdf_mean, spdf_sd = mean_sd(finals(results, "spdf-0.75"))
    ax2.errorbar([0.76], [spdf_mean], yerr=[spdf_sd], fmt="s", color="tab:red", capsize=3,
                 label="spdf")  # fmt: skip
    seeds = len(results["dense"])
    ax2.set(xlabel="sparsity of the block matrices", ylabel="final validation loss",
            title=f"final validation loss, mean ± sd over {seeds} seed(s)")  # fmt: skip
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(results: dict[str, list[dict]], steps: int, jobs: int, command: str) -> None:
    seeds = len(results["dense"])
    rows = [f"| run | algorithm | sparsity | matmul FLOPs vs dense | final val loss (mean ± sd, "
            f"{seeds} seeds) | Δ vs dense, same seed (mean ± sd) | wall-clock (s, mean) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    dense = finals(results, "dense")
    for name, per_seed in results.items():
        algo = name.partition("-")[0]
        loss_mean, loss_sd = mean_sd(finals(results, name))
        delta_mean, delta_sd = mean_sd([a - b for a, b in zip(finals(results, name), dense)])
        first = per_seed[0]
        rows.append(
            f"| {name} | {algo} | {first['sparsity']:.3f} | {first['flops_ratio']:.2f}× | "
            f"{loss_mean:.4f} ± {loss_sd:.4f} | {delta_mean:+.4f} ± {delta_sd:.4f} | "
            f"{statistics.fmean(r['wall_s'] for r in per_seed):.0f} |"
        )
    per_seed_dense = ", ".join(f"{x:.4f}" for x in dense)
    unigram = results["dense"][0].get("val_unigram_entropy") or math.nan
    text = f"""# Sparse training quality study

Dense vs block-sparse training (static masks, gradual magnitude pruning, RigL) at 50 / 75 /
87.5% sparsity of the transformer-block matrices, plus SPDF (75% sparse pre-training, dense for
the last 25% of steps), all at **equal tokens** ({steps} steps × 8 × 64 tokens) on the
built-in Shakespeare corpus, each with {seeds} seed(s) (`--train.seed` 0..{seeds - 1}: weights,
masks and data order). Embeddings, norms, biases and the (tied) head stay dense, so the
"matmul FLOPs vs dense" column (6 × weights multiplied per token, including the head) shrinks
less than the block matrices do. Model: 2 blocks, d_model 128, d_ffn 512, 2 heads, BPE vocab
1024, fp32 (the `masked` kernel; speed is measured separately in BENCHMARKS.md,
`sparse_train_step`). Masks: balanced 16×16 blocks, uniform level per matrix; GMP prunes from
dense between step 0 and 75% of training every 10 steps; RigL updates every 10 steps until
75% of training with α = 0.3 (cosine-decayed); final sparsity is the mask sparsity at the end
(SPDF ends dense). The Δ column pairs each run with the dense run of the same seed.

{chr(10).join(rows)}

Dense per seed: {per_seed_dense}; validation unigram entropy {unigram:.4f}.

READING

![validation loss](sparsity-study.png)

Command (regenerates this page and the figure; the reading above is written by hand):

    {command}

Machine: {machine().replace(" (1 threads)", "")}, {jobs} runs at a time, one thread each<br>
Date: {datetime.date.today().isoformat()}
"""
    (ROOT / "docs" / "sparsity-study.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per variant")
    parser.add_argument("--jobs", type=int, default=4, help="runs at the same time")
    parser.add_argument("--out", default="runs/sparsity-study")
    parser.add_argument("--reuse", action="store_true", help="skip runs that already finished")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # several runs share 2 busy cores: no oversubscription
    root = ROOT / args.out
    wanted = set(filter(None, args.only.split(",")))
    from concurrent.futures import ThreadPoolExecutor

    todo = [(n, f) for n, f in runs() if not wanted or n in wanted]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            n: [pool.submit(run_one, n, f, root, args.steps, seed, args.reuse)
                for seed in range(args.seeds)]
            for n, f in todo
        }  # fmt: skip
        results = {n: [fut.result() for fut in futs] for n, futs in futures.items()}
    if wanted:
        return
    (ROOT / "docs").mkdir(exist_ok=True)
    plot(results, ROOT / "docs" / "sparsity-study.png")
    command = (
        f".venv/bin/python benchmarks/sparsity_study.py --steps {args.steps} "
        f"--seeds {args.seeds} --jobs {args.jobs}"
    )
    write_doc(results, args.steps, args.jobs, command)
    print((ROOT / "docs" / "sparsity-study.md").read_text())


if __name__ == "__main__":
    main()
