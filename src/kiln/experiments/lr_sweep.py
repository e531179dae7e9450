"""``kiln scale --lr-sweep``: does the best learning rate transfer across width?

Train the same short run on the built-in corpus at widths w0, 4·w0 and 16·w0 over a grid of
peak LRs (powers of 2), in both the standard parametrization and μP (base width w0, so the
two differ at w0 only by μP's constants), and take the final validation loss. μP predicts the
best LR stays put (within one grid step) as width grows; under SP it moves down. Runs are
in-process (tiny models), two at a time in worker processes with one thread each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kiln.fsio import save_figure

DEFAULT_WIDTHS = (8, 32, 128)
DEFAULT_LRS = {
    "sp": tuple(2.0**k for k in range(-10, -2)),
    "mup": tuple(2.0**k for k in range(-7, 0)),
}
"""Powers of 2 around each parametrization's optimum (μP's constants move its optimum up)."""


_DATA = None
"""The prepared corpus, loaded once per worker process by :func:`_init_worker`."""


def _init_worker(corpus: str, vocab: int, seq_len: int, cache_dir: str) -> None:
    import torch

    from kiln.config import DataConfig
    from kiln.data import prepare_data

    torch.set_num_threads(1)
    global _DATA
    cfg = DataConfig(corpus=corpus, vocab_size=vocab, seq_len=seq_len, cache_dir=cache_dir)
    _DATA = prepare_data(cfg, log=lambda *_: None)


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (parametrization, width, lr) run; returns the job with its final val loss."""
    import numpy as np
    import torch

    from kiln.data import val_batches
    from kiln.experiments.coord_check import build, toy_shape
    from kiln.models.gpt import cross_entropy
    from kiln.train.optim import LRSchedule

    data, seq, bs, steps = _DATA, job["seq_len"], job["batch_size"], job["steps"]
    shape = toy_shape(job["width"], data.tokenizer.vocab_size, seq, job["n_layers"], job["heads"])
    model, opt = build(shape, job["param"], job["lr"], job["base_width"], job["seed"], 0.1)
    sched = LRSchedule(job["lr"], max(1, steps // 20), steps, 0.1, "cosine")
    rng = np.random.default_rng(job["seed"])
    train = np.asarray(data.train, dtype=np.int64)
    loss = float("nan")
    for step in range(steps):
        starts = rng.integers(0, len(train) - seq - 1, bs)
        x = torch.from_numpy(np.stack([train[s : s + seq + 1] for s in starts]))
        sched.apply(opt, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_t = cross_entropy(model(x[:, :-1]), x[:, 1:])
        if not torch.isfinite(loss_t):
            return {**job, "val_loss": math.inf}
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    total, n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for xb, yb in val_batches(data.val, seq, bs, job["eval_batches"]):
            total += float(cross_entropy(model(xb), yb)) * len(xb)
            n += len(xb)
    loss = total / n
    return {**job, "val_loss": loss if math.isfinite(loss) else math.inf}


def lr_sweep(
    widths=DEFAULT_WIDTHS, lrs=DEFAULT_LRS, *, corpus="builtin:all", vocab=1024, seq_len=64,
    batch_size=16, steps=200, n_layers=2, heads=2, eval_batches=32, seed=0, cache_dir="",
    workers=2, log=print,
) -> dict[str, Any]:  # fmt: skip
    """All runs; returns {'runs': [...], 'best': {param: {width: lr}}, 'shift_steps': ...}."""
    import multiprocessing as mp

    common = dict(seq_len=seq_len, batch_size=batch_size, steps=steps, n_layers=n_layers,
                  heads=heads, eval_batches=eval_batches, seed=seed,
                  base_width=min(widths))  # fmt: skip
    jobs = [dict(common, param=p, width=w, lr=lr) for w in sorted(widths, reverse=True)
            for p in ("sp", "mup") for lr in lrs[p]]  # fmt: skip
    ctx = mp.get_context("spawn")
    runs = []
    with ctx.Pool(workers, _init_worker, (corpus, vocab, seq_len, cache_dir)) as pool:
        for r in pool.imap_unordered(train_one, jobs):
            log(f"{r['param']:>3} width {r['width']:>4} lr 2^{math.log2(r['lr']):+.0f}: "
                f"val loss {r['val_loss']:.4f}")  # fmt: skip
            runs.append(r)
    return summarise(runs, sorted(widths), {p: list(v) for p, v in lrs.items()})


def summarise(runs: list[dict], widths: list[int], lrs: dict[str, list[float]]) -> dict:
    best: dict[str, dict[int, float]] = {}
    for p in ("sp", "mup"):
        best[p] = {}
        for w in widths:
            rs = [r for r in runs if r["param"] == p and r["width"] == w]
            best[p][w] = min(rs, key=lambda r: r["val_loss"])["lr"]
    shift = {p: {w: round(math.log2(best[p][w] / best[p][widths[0]])) for w in widths}
             for p in best}  # fmt: skip
    return {"widths": widths, "lrs": lrs, "runs": sorted(runs, key=_key), "best_lr": best,
            "shift_grid_steps": shift}  # fmt: skip


def _key(r: dict) -> tuple:
    return (r["param"], r["width"], r["lr"])


def plot(result: dict[str, Any], out: str | Path, command: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    finite = [r["val_loss"] for r in result["runs"] if math.isfinite(r["val_loss"])]
    top = min(max(finite), min(finite) + 1.5)
    for ax, p, title in zip(axes, ("sp", "mup"), ("standard parametrization", "μP")):
        for w in result["widths"]:
            rs = [r for r in result["runs"] if r["param"] == p and r["width"] == w]
            xs = [r["lr"] for r in rs]
            ys = [min(r["val_loss"], top) for r in rs]
            (line,) = ax.plot(xs, ys, marker="o", label=f"width {w}")
            b = result["best_lr"][p][w]
            ax.axvline(b, color=line.get_color(), ls=":", lw=1)
        shifts = result["shift_grid_steps"][p]
        ax.set_title(f"{title}: best-LR shift {shifts[result['widths'][-1]]:+d} grid steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats/token)")
    return save_figure(fig, out, command, dpi=110)


def run_lr_sweep(s, root: str | Path, command: str = "", log=print, **overrides) -> dict:
    """``kiln scale --lr-sweep``: sweep, write ROOT/lr_sweep.json and ROOT/lr-transfer.png."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    result = lr_sweep(corpus=s.corpus, vocab=s.vocab_size, seed=s.seed, cache_dir=s.cache_dir,
                      log=log, **overrides)  # fmt: skip
    result["command"] = command
    (root / "lr_sweep.json").write_text(json.dumps(result, indent=2))
    plot(result, root / "lr-transfer.png", command)
    for p in ("sp", "mup"):
        best = ", ".join(f"{w}: 2^{math.log2(lr):+.0f}" for w, lr in result["best_lr"][p].items())
        log(f"{p:>3} best LR by width: {best}; shift {result['shift_grid_steps'][p]}")
    log(f"wrote {root / 'lr_sweep.json'} and {root / 'lr-transfer.png'}")
    return result
