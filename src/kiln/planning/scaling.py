"""Scaling-law fits: loss against compute, and the Chinchilla parametric loss L(N, D).

* :func:`fit_power_law` fits ``L(C) = (C / C0)^(-alpha) + L_inf`` (the form of the
  Cerebras-GPT Pile law) by least squares on log L with ``scipy.optimize.curve_fit``,
  parameterising ``log10 C0`` so the optimiser works on O(1) numbers.
* :func:`fit_chinchilla` fits ``L(N, D) = E + A / N^a + B / D^b`` as Hoffmann et al. (2022)
  do: Huber loss (delta 1e-3) between log L and ``logsumexp(log A - a log N, log B - b log D,
  log E)``, minimised with L-BFGS-B from a small grid of starting points.

Both give 5–95% confidence intervals by bootstrap: resample the points with replacement, refit
(warm-started at the full-data fit), take percentiles. numpy/scipy are imported inside the
functions so ``import kiln.planning`` stays light.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.fsio import atomic_write_json, save_figure


class FitError(KilnError):
    """Scaling-law points or a saved fit that cannot be used."""


@dataclass
class PowerLawFit:
    """``L(C) = (C / c0)^(-alpha) + l_inf`` with bootstrap intervals."""

    alpha: float
    c0: float
    l_inf: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """5% and 95% bootstrap percentiles for 'alpha', 'c0', 'l_inf' (empty if not bootstrapped)."""
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    """Bootstrap fits as (alpha, log10 c0, l_inf), used by predict_interval."""
    name: str = ""
    n_points: int = 0

    def predict(self, c: Any) -> Any:
        """Loss at compute ``c`` (scalar or array)."""
        import numpy as np

        return (np.asarray(c, dtype=float) / self.c0) ** (-self.alpha) + self.l_inf

    def predict_interval(self, c: Any, lo: float = 5.0, hi: float = 95.0) -> tuple[Any, Any]:
        """Percentile band of the bootstrap fits' predictions (the point prediction if none)."""
        import numpy as np

        c = np.asarray(c, dtype=float)
        if not self.samples:
            p = self.predict(c)
            return p, p
        s = np.asarray(self.samples, dtype=float)
        preds = (c[None, ...] / 10.0 ** s[:, 1].reshape((-1,) + (1,) * c.ndim)) ** (
            -s[:, 0].reshape((-1,) + (1,) * c.ndim)
        ) + s[:, 2].reshape((-1,) + (1,) * c.ndim)
        return np.percentile(preds, lo, axis=0), np.percentile(preds, hi, axis=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (plain floats and lists)."""
        return {
            "kind": "power_law",
            "formula": "L = (C / c0)^(-alpha) + l_inf",
            "name": self.name,
            "alpha": float(self.alpha),
            "c0": float(self.c0),
            "l_inf": float(self.l_inf),
            "n_points": int(self.n_points),
            "ci": {k: [float(v[0]), float(v[1])] for k, v in self.ci.items()},
            "samples": [[float(x) for x in s] for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "fit") -> PowerLawFit:
        """Inverse of :meth:`to_dict`; a missing field is a :class:`FitError`."""
        missing = [k for k in ("alpha", "c0", "l_inf") if k not in d]
        if missing:
            raise FitError(f"Scaling-law fit {source} lacks field(s) {', '.join(missing)}.")
        try:
            return cls(
                alpha=float(d["alpha"]),
                c0=float(d["c0"]),
                l_inf=float(d["l_inf"]),
                ci={k: (float(v[0]), float(v[1])) for k, v in d.get("ci", {}).items()},
                samples=[tuple(float(x) for x in s) for s in d.get("samples", [])],
                name=str(d.get("name", "")),
                n_points=int(d.get("n_points", 0)),
            )
        except (TypeError, ValueError, IndexError) as e:
            raise FitError(f"Scaling-law fit {source} has a non-numeric field ({e}).") from None

    def save(self, path: str | Path) -> None:
        """Write as JSON (temp file, fsync, rename)."""
        atomic_write_json(Path(path), self.to_dict())


@dataclass
class ChinchillaFit:
    """``L(N, D) = e + a_coef / N^alpha + b_coef / D^beta`` with bootstrap intervals."""

    e: float
    a_coef: float
    b_coef: float
    alpha: float
    beta: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_points: int = 0

    def predict(self, n: Any, d: Any) -> Any:
        """Loss for ``n`` parameters trained on ``d`` tokens."""
        import numpy as np

        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.e + self.a_coef / n**self.alpha + self.b_coef / d**self.beta

    def optimal_ratio(self, flops: float) -> float:
        """Compute-optimal D/N at budget C = 6ND (Hoffmann et al. eq. 4)."""
        g = (self.alpha * self.a_coef / (self.beta * self.b_coef)) ** (1 / (self.alpha + self.beta))
        n_opt = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return (flops / 6 / n_opt) / n_opt

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "kind": "chinchilla",
            "formula": "L = e + a_coef / N^alpha + b_coef / D^beta",
            **{k: float(getattr(self, k)) for k in ("e", "a_coef", "b_coef", "alpha", "beta")},
            "n_points": int(self.n_points),
            "ci": {k: [float(v[0]), float(v[1])] for k, v in self.ci.items()},
        }


# Dey et al. (2023), Cerebras-GPT, Pile test loss against training FLOPs (their convention).
CEREBRAS_GPT_PILE = PowerLawFit(alpha=0.0737, c0=5.984e22, l_inf=0.5066, name="cerebras-gpt-pile")
BUILTIN_FITS: dict[str, PowerLawFit] = {CEREBRAS_GPT_PILE.name: CEREBRAS_GPT_PILE}


def load_fit(name_or_path: str | Path) -> PowerLawFit:
    """A built-in fit by name ('cerebras-gpt-pile') or a JSON file written by ``save``."""
    if str(name_or_path) in BUILTIN_FITS:
        return BUILTIN_FITS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise FitError(
            f"Scaling-law fit {str(name_or_path)!r} is neither a file nor a built-in fit "
            f"({', '.join(BUILTIN_FITS)})."
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FitError(f"Scaling-law fit {str(path)!r} is not valid JSON ({e.msg}).") from None
    if not isinstance(raw, dict):
        raise FitError(f"Scaling-law fit {str(path)!r} holds a JSON {type(raw).__name__}, "
                       "not an object.")  # fmt: skip
    return PowerLawFit.from_dict(raw, source=repr(str(path)))


def _as_points(name: str, values: Any, n_min: int, what: str) -> Any:
    import numpy as np

    arr = np.asarray(values, dtype=float).ravel()
    if arr.size < n_min:
        raise FitError(f"{what} needs at least {n_min} points but got {arr.size}.")
    bad = arr[~(np.isfinite(arr) & (arr > 0))]
    if bad.size:
        raise FitError(f"{name} must be positive and finite but contains {bad[0]!r}.")
    return arr


def _fit_power_law_once(logc: Any, logl: Any, p0: Any) -> Any:
    import numpy as np
    from scipy.optimize import curve_fit

    def model(x, alpha, log10_c0, l_inf):
        return np.log(10.0 ** (-alpha * (x - log10_c0)) + l_inf)

    best, best_sse = None, np.inf
    l_max = float(np.exp(logl).min()) * (1 - 1e-6)
    bounds = ([1e-5, -50.0, 0.0], [10.0, 100.0, l_max])
    for start in p0:
        start = np.clip(start, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        try:
            p, _ = curve_fit(model, logc, logl, p0=start, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((model(logc, *p) - logl) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    return best


def _power_law_starts(logc: Any, loss: Any) -> list[Any]:
    """Starting points: a few alphas and floors, C0 solved through the middle point."""
    import numpy as np

    starts = []
    mid = len(logc) // 2
    for frac in (0.0, 0.5, 0.8, 0.95):
        l_inf = frac * float(loss.min())
        for alpha in (0.05, 0.2, 0.5):
            excess = max(float(loss[mid]) - l_inf, 1e-6)
            starts.append(np.array([alpha, logc[mid] + np.log10(excess) / alpha, l_inf]))
    return starts


def fit_power_law(
    c: Any, loss: Any, n_bootstrap: int = 1000, seed: int = 0, name: str = ""
) -> PowerLawFit:
    """Fit ``L(C) = (C/C0)^(-alpha) + L_inf`` to (compute, loss) points, with bootstrap CIs."""
    import numpy as np

    c = _as_points("compute", c, 4, "A power-law fit")
    loss = _as_points("loss", loss, 4, "A power-law fit")
    if c.size != loss.size:
        raise FitError(f"compute has {c.size} points but loss has {loss.size}; they must match.")
    order = np.argsort(c)
    logc, logl = np.log10(c[order]), np.log(loss[order])
    best = _fit_power_law_once(logc, logl, _power_law_starts(logc, loss[order]))
    if best is None:
        raise FitError(f"The power-law fit did not converge on {c.size} points.")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = np.sort(rng.integers(0, c.size, c.size))
        if np.unique(logc[idx]).size < 3:
            continue
        p = _fit_power_law_once(logc[idx], logl[idx], [best])
        if p is not None:
            samples.append((float(p[0]), float(p[1]), float(p[2])))
    ci = {}
    if samples:
        s = np.asarray(samples)
        cols = {"alpha": s[:, 0], "c0": 10.0 ** s[:, 1], "l_inf": s[:, 2]}
        ci = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in cols.items()}
    return PowerLawFit(alpha=float(best[0]), c0=float(10.0 ** best[1]), l_inf=float(best[2]),
                       ci=ci, samples=samples, name=name, n_points=int(c.size))  # fmt: skip


def _chinchilla_objective(p: Any, logn: Any, logd: Any, logl: Any, delta: float) -> Any:
    """Huber loss of log-space residuals and its analytic gradient (for L-BFGS-B)."""
    import numpy as np

    a, b, e, alpha, beta = p
    u = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    m = u.max(axis=0)
    w = np.exp(u - m)
    z = w.sum(axis=0)
    pred, w = m + np.log(z), w / z
    r = pred - logl
    small = np.abs(r) <= delta
    loss = np.sum(np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)))
    g = np.where(small, r, delta * np.sign(r))
    grad = np.array([np.sum(g * w[0]), np.sum(g * w[1]), np.sum(g * w[2]),
                     -np.sum(g * w[0] * logn), -np.sum(g * w[1] * logd)])  # fmt: skip
    return float(loss), grad


def _fit_chinchilla_once(logn: Any, logd: Any, logl: Any, starts: list[Any], delta: float) -> Any:
    import numpy as np
    from scipy.optimize import minimize

    best, best_f = None, np.inf
    for x0 in starts:
        res = minimize(_chinchilla_objective, x0, args=(logn, logd, logl, delta),
                       method="L-BFGS-B", jac=True)  # fmt: skip
        if np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, res.fun
    return best


def fit_chinchilla(
    n: Any, d: Any, loss: Any, n_bootstrap: int = 200, seed: int = 0, delta: float = 1e-3
) -> ChinchillaFit:
    """Fit ``L = E + A/N^a + B/D^b`` (Hoffmann et al. 2022, approach 3) with bootstrap CIs.

    Starting grid (coarser than Hoffmann et al.'s 4,500 points): log A, log B in
    {0, 5, 10, 15, 20}, log E = 0, exponents in {0.3, 0.8} — 100 L-BFGS-B runs with an analytic
    gradient for the full fit, one warm-started run per bootstrap resample.
    """
    import itertools

    import numpy as np

    n = _as_points("params", n, 6, "A Chinchilla fit")
    d = _as_points("tokens", d, 6, "A Chinchilla fit")
    loss = _as_points("loss", loss, 6, "A Chinchilla fit")
    if not n.size == d.size == loss.size:
        raise FitError(f"params, tokens and loss have {n.size}, {d.size} and {loss.size} points; "
                       "they must match.")  # fmt: skip
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    grid = itertools.product((0, 5, 10, 15, 20), (0, 5, 10, 15, 20), (0,), (0.3, 0.8), (0.3, 0.8))
    starts = [np.array(g, dtype=float) for g in grid]
    best = _fit_chinchilla_once(logn, logd, logl, starts, delta)
    if best is None:
        raise FitError(f"The Chinchilla fit did not converge on {n.size} points.")
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n.size, n.size)
        p = _fit_chinchilla_once(logn[idx], logd[idx], logl[idx], [best], delta)
        if p is not None:
            boot.append([np.exp(p[2]), np.exp(p[0]), np.exp(p[1]), p[3], p[4]])
    ci = {}
    if boot:
        arr = np.asarray(boot)
        keys = ("e", "a_coef", "b_coef", "alpha", "beta")
        ci = {k: (float(np.percentile(arr[:, i], 5)), float(np.percentile(arr[:, i], 95)))
              for i, k in enumerate(keys)}  # fmt: skip
    a, b, e, alpha, beta = (float(x) for x in best)
    return ChinchillaFit(e=math.exp(e), a_coef=math.exp(a), b_coef=math.exp(b), alpha=alpha,
                         beta=beta, ci=ci, n_points=int(n.size))  # fmt: skip


def plot_fit(
    points: Any, fit: PowerLawFit, out_png: str | Path, holdout: Any = None, title: str = ""
) -> Path:
    """Log-x plot: points, fitted curve, bootstrap band (extended past the data), held-out point.

    ``points`` is ``(compute_array, loss_array)``; ``holdout`` an optional ``(compute, loss)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c, loss = (np.asarray(v, dtype=float) for v in points)
    c_hi = max(c.max(), float(holdout[0]) if holdout is not None else 0.0) * 10
    grid = np.logspace(np.log10(c.min() / 2), np.log10(c_hi), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lo, hi = fit.predict_interval(grid)
    if fit.samples:
        ax.fill_between(grid, lo, hi, alpha=0.25, label="5–95% bootstrap band")
    ax.plot(grid, fit.predict(grid),
            label=f"L = (C/{fit.c0:.3g})^-{fit.alpha:.4f} + {fit.l_inf:.3f}")  # fmt: skip
    ax.scatter(c, loss, color="k", zorder=3, label="fitted points")
    if holdout is not None:
        ax.scatter([holdout[0]], [holdout[1]], marker="*", s=160, color="tab:red", zorder=4,
                   label="held out")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or fit.name or "loss vs compute")
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)
