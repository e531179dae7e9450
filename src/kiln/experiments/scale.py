"""``kiln scale``: train a family of compute-optimal models, fit L(C), check the extrapolation.

Each member is its own ordinary ``kiln train`` run directory ``DIR/member-XX-d<width>-L<layers>``
trained in a subprocess (``python -m kiln.cli train``; ``$KILN_SCALE_THREADS`` threads, default
1), so no state leaks between members and a killed sweep resumes where it stopped: a member
with ``summary.json`` is skipped, one with a ``config.yaml`` continues with ``--resume`` (from its
newest checkpoint, or from step 0 if it died before the first one). Then::

    L(C) = (C / C0)^(-alpha) + L_inf        (kiln.planning.scaling.fit_power_law)

is fitted to every member except the one with the most compute, which is predicted and
compared. With several tokens-per-parameter ratios (N and D varied independently) the Chinchilla
form L(N, D) = E + A/N^a + B/D^b is fitted too. Results: ``DIR/fit.json`` (loadable by
``kiln scale --predict C --fit DIR/fit.json``) and ``DIR/scaling.png``.

Default family (sized for about 15–25 minutes on 2 shared CPU cores, see docs/scaling.md):
widths 32…96 at 2 layers × 4 heads, d_ffn = 4d, BPE vocab 1024, 128-token windows on
``builtin:all`` (5.6M training tokens: the largest member sees each token at most once), μP with
one LR for every width, and D = 20 × N where N counts *non-embedding* parameters (Kaplan et
al. 2020: with the embedding table included, small-width points bend off the power law). Compute C
is the model-FLOP count the trainer reports (6·N_matmul + 12·L·S·d per token, head included).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError
from kiln.planning.flops import Shape, param_count


class ScaleError(KilnError):
    """A sweep that cannot continue (a member failed, or the directory holds another sweep)."""


@dataclass
class ScaleSettings:
    """Everything that defines a sweep; stored in DIR/scale.json and checked on re-runs."""

    widths: list[int] = field(default_factory=lambda: [16, 24, 32, 40, 48, 56, 64])
    """d_model of each member (ascending)."""
    n_layers: int = 2
    n_heads: int = 2
    corpus: str = "builtin:all"
    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    tokens_per_param: list[float] = field(default_factory=lambda: [20.0])
    """Training tokens per non-embedding parameter; several values also vary D at fixed N."""
    lr: float = 2e-2
    parametrization: str = "mup"
    mup_base_width: int = 32
    precision: str = "bf16"
    eval_batches: int = 24
    max_steps: int | None = None
    """Cap on every member's steps (to shrink the family for tests)."""
    seed: int = 0
    checkpoint_every: int = 200
    cache_dir: str = ""

    def validate(self) -> None:
        if len(self.widths) * len(self.tokens_per_param) < 5:
            raise ConfigError(
                f"kiln scale needs at least 5 members (4 to fit and 1 held out) but --widths "
                f"{','.join(map(str, self.widths))} gives {len(self.widths)}."
            )
        for w in self.widths:
            if w <= 0 or w % self.n_heads:
                raise ConfigError(
                    f"Width {w} must be a positive multiple of --n-heads {self.n_heads}."
                )
        for r in self.tokens_per_param:
            if not r > 0:
                raise ConfigError(f"--tokens-per-param {r} must be > 0.")


@dataclass
class Member:
    index: int
    width: int
    ratio: float
    non_embedding_params: int
    steps: int


def members(s: ScaleSettings) -> list[tuple[str, Member]]:
    """The family, smallest first: (directory name, member)."""
    out = []
    pairs = [(w, r) for r in s.tokens_per_param for w in sorted(s.widths)]
    for i, (w, r) in enumerate(pairs):
        shape = Shape(n_layers=s.n_layers, d_model=w, n_heads=s.n_heads, d_ffn=4 * w,
                      vocab_size=s.vocab_size, max_seq_len=s.seq_len)  # fmt: skip
        n_ne = param_count(shape, include_embeddings=False)
        steps = max(1, math.ceil(r * n_ne / (s.batch_size * s.seq_len)))
        if s.max_steps is not None:
            steps = min(steps, s.max_steps)
        tag = f"-r{r:g}" if len(s.tokens_per_param) > 1 else ""
        out.append((f"member-{i:02d}-d{w}-L{s.n_layers}{tag}", Member(i, w, r, n_ne, steps)))
    return out


def train_flags(s: ScaleSettings, m: Member, run_dir: Path) -> list[str]:
    """``kiln train`` flags for one member."""
    flags = {
        "run.dir": run_dir, "run.device": "cpu", "run.overwrite": "true",
        "data.corpus": s.corpus, "data.vocab_size": s.vocab_size, "data.seq_len": s.seq_len,
        "model.preset": "tiny", "model.n_layers": s.n_layers, "model.d_model": m.width,
        "model.n_heads": s.n_heads, "model.d_ffn": 4 * m.width, "model.max_seq_len": s.seq_len,
        "model.parametrization": s.parametrization, "model.mup_base_width": s.mup_base_width,
        "train.batch_size": s.batch_size, "train.max_steps": m.steps, "train.lr": s.lr,
        "train.precision": s.precision, "train.seed": s.seed, "train.eval_every": 0,
        "train.eval_batches": s.eval_batches, "checkpoint.every": s.checkpoint_every,
        "checkpoint.keep": 1, "log.every": 10, "log.progress": "false",
        "log.tensorboard": "false",
    }  # fmt: skip
    if s.cache_dir:
        flags["data.cache_dir"] = s.cache_dir
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def _check_settings(root: Path, s: ScaleSettings) -> None:
    """A sweep directory holds one family: refuse to mix members made with other settings."""
    from kiln.fsio import atomic_write_json

    path = root / "scale.json"
    mine = asdict(s)
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            raise ScaleError(
                f"{root} holds a sweep made with a different {diff[0]} ({saved.get(diff[0])!r}, "
                f"not {mine[diff[0]]!r}); use another --run.dir or the same settings."
            )
    atomic_write_json(path, mine)


def train_member(s: ScaleSettings, m: Member, run_dir: Path, log=print) -> dict[str, Any]:
    """Train (or resume, or skip) one member in a subprocess; return its summary.json."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        log(f"{run_dir.name}: finished earlier, skipped")
        return json.loads(summary.read_text())
    if (run_dir / "config.yaml").is_file():
        args = ["--resume", "--run.dir", str(run_dir)]
        log(f"{run_dir.name}: resuming")
    else:
        args = train_flags(s, m, run_dir)
        log(f"{run_dir.name}: N = {m.non_embedding_params:,} non-embedding, "
            f"{m.steps} steps × {s.batch_size * s.seq_len} tokens")  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("KILN_SCALE_THREADS", "1"))
    started = time.perf_counter()
    with open(run_dir / "train.log", "a") as out:
        proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", *args],
                              stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    if proc.returncode != 0 or not summary.is_file():
        raise ScaleError(
            f"{run_dir.name} failed (exit {proc.returncode}); see {run_dir / 'train.log'} and "
            "re-run the same command to resume."
        )
    result = json.loads(summary.read_text())
    log(f"{run_dir.name}: val loss {result['final_val_loss']:.4f}, C = {result['flops']:.3g} "
        f"FLOPs, {time.perf_counter() - started:.0f}s")  # fmt: skip
    return result


def run_scale(
    s: ScaleSettings, root: str | Path, stop_after: int | None = None, n_bootstrap: int = 1000,
    jobs: int = 2, command: str = "", log=print,
) -> dict[str, Any] | None:  # fmt: skip
    """Train the family under ``root`` and fit it; None if stopped early by ``stop_after``."""
    s.validate()
    root = Path(root)
    _check_settings(root, s)
    started = time.perf_counter()
    family = members(s)
    todo = family if stop_after is None else family[:stop_after]
    # Longest first onto ``jobs`` single-threaded workers: the largest member trains beside
    # all the others, so the wall-clock is about max(largest, total / jobs).
    order = sorted(todo, key=lambda nm: -nm[1].steps * nm[1].width ** 2)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {name: pool.submit(train_member, s, m, root / name, log) for name, m in order}
        summaries = {name: f.result() for name, f in futures.items()}
    if stop_after is not None and stop_after < len(family):
        log(f"stopped after {stop_after} member(s); re-run without --stop-after to continue")
        return None
    rows = [{"name": name, "width": m.width, "tokens_per_param": m.ratio, **summaries[name]}
            for name, m in family]  # fmt: skip
    result = fit_family(rows, s, n_bootstrap=n_bootstrap)
    result["wall_s"] = time.perf_counter() - started
    result["train_wall_s"] = sum(r["wall_s"] for r in rows)
    result["command"] = command
    _save(root, result, rows)
    log(describe(result))
    return result


def fit_family(rows: list[dict[str, Any]], s: ScaleSettings, n_bootstrap: int = 1000) -> dict:
    """Fit L(C) without the largest-compute member; predict it; Chinchilla if D/N varies."""
    import numpy as np

    from kiln.planning.scaling import fit_chinchilla, fit_power_law

    rows = sorted(rows, key=lambda r: r["flops"])
    held, fitted = rows[-1], rows[:-1]
    main_ratio = s.tokens_per_param[0]
    on_ratio = [r for r in fitted if r["tokens_per_param"] == main_ratio]
    c = np.array([r["flops"] for r in on_ratio])
    loss = np.array([r["final_val_loss"] for r in on_ratio])
    fit = fit_power_law(c, loss, n_bootstrap=n_bootstrap, name="kiln-scale")
    pred = float(fit.predict(held["flops"]))
    lo, hi = (float(x) for x in fit.predict_interval(held["flops"]))
    result: dict[str, Any] = {
        **fit.to_dict(),
        "holdout": {
            "name": held["name"], "flops": held["flops"], "loss": held["final_val_loss"],
            "predicted": pred, "predicted_5_95": [lo, hi],
            "error": (pred - held["final_val_loss"]) / held["final_val_loss"],
        },
        "points": [{k: r[k] for k in ("name", "width", "tokens_per_param", "params",
                                      "non_embedding_params", "tokens", "flops", "steps",
                                      "final_val_loss", "wall_s")} for r in rows],
        "compute_span": rows[-1]["flops"] / rows[0]["flops"],
        "chinchilla": None,
        "chinchilla_note": "not fitted: every member has the same tokens/param, so N and D are "
        "collinear; give several --tokens-per-param values to fit L(N, D)",
    }  # fmt: skip
    if len({r["tokens_per_param"] for r in fitted}) > 1 and len(fitted) >= 6:
        ch = fit_chinchilla([r["non_embedding_params"] for r in fitted],
                            [r["tokens"] for r in fitted],
                            [r["final_val_loss"] for r in fitted],
                            n_bootstrap=min(200, n_bootstrap))  # fmt: skip
        result["chinchilla"], result["chinchilla_note"] = ch.to_dict(), "fitted on N_non-embedding"
        result["chinchilla"]["holdout_predicted"] = float(
            ch.predict(held["non_embedding_params"], held["tokens"])
        )
    return result


def _save(root: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from kiln.fsio import atomic_write_json
    from kiln.planning.scaling import PowerLawFit, plot_fit

    fit = PowerLawFit.from_dict(result)
    pts = [p for p in result["points"] if p["name"] != result["holdout"]["name"]]
    h = result["holdout"]
    plot_fit(
        ([p["flops"] for p in pts], [p["final_val_loss"] for p in pts]), fit,
        root / "scaling.png", holdout=(h["flops"], h["loss"]),
        title=f"kiln scale: {len(rows)} members; held-out error {h['error']:+.2%}",
    )  # fmt: skip
    atomic_write_json(root / "fit.json", result)


def describe(r: dict[str, Any]) -> str:
    """Human-readable summary of a fit result."""
    ci = r.get("ci", {})

    def band(k: str) -> str:
        return f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else ""

    h = r["holdout"]
    lines = [
        f"fit (without {h['name']}): L(C) = (C / C0)^(-alpha) + L_inf, 5–95% bootstrap CIs",
        f"  alpha  {r['alpha']:.4g}{band('alpha')}",
        f"  C0     {r['c0']:.4g}{band('c0')}",
        f"  L_inf  {r['l_inf']:.4g}{band('l_inf')}",
        f"held out {h['name']}: C = {h['flops']:.3g}, val loss {h['loss']:.4f}, predicted "
        f"{h['predicted']:.4f} [{h['predicted_5_95'][0]:.4f}, {h['predicted_5_95'][1]:.4f}] "
        f"→ error {h['error']:+.2%}",
        f"compute span {r['compute_span']:.1f}×; wall-clock {r.get('wall_s', 0):.0f}s",
    ]
    return "\n".join(lines)


def predict(c: float, fit_spec: str) -> dict[str, Any]:
    """Loss the fit ``fit_spec`` (a fit.json or a built-in name) predicts at compute ``c``."""
    from kiln.planning.scaling import load_fit

    if not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
        raise ConfigError(f"--predict is {c!r} but must be a positive number of FLOPs.")
    fit = load_fit(fit_spec)
    lo, hi = fit.predict_interval(c)
    return {
        "flops": float(c), "loss": float(fit.predict(c)), "loss_5_95": [float(lo), float(hi)],
        "fit": fit.name or str(fit_spec), "alpha": fit.alpha, "c0": fit.c0, "l_inf": fit.l_inf,
    }  # fmt: skip
