"""``kiln mup coord-check``: does activation size stay flat as width grows? (Yang et al. 2021)

For each width and both parametrizations (SP: GPT-2 init, one Adam LR; μP: kiln.models.mup),
train a 2-layer model a few Adam steps on a fixed synthetic token stream (the check is about
activation *scale*, which does not need real text), then record the mean |x| of four
activations with forward hooks on a fixed batch: the embedding output (input of block 0), the
attention and MLP outputs (averaged over layers) and the logits. Under μP each curve is flat in
width (slope of log|x| against log width ≈ 0); under SP the updates ΔW·x grow ∝ width, so the
curves climb. Writes a plot and a JSON of the numbers beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.fsio import save_figure

LAYER_TYPES = ("embedding", "attention", "mlp", "logits")


def toy_shape(width: int, vocab: int = 1024, seq_len: int = 64, n_layers: int = 2, heads: int = 4):
    """A small GPT of ``width`` (d_head = width / heads, d_ffn = 4 width)."""
    from kiln.models.gpt import GPTConfig

    if width % heads:
        raise ConfigError(f"Width {width} must be a multiple of {heads} (the number of heads).")
    return GPTConfig(n_layers=n_layers, d_model=width, n_heads=heads, n_kv_heads=heads,
                     d_head=width // heads, d_ffn=4 * width, vocab_size=vocab,
                     max_seq_len=seq_len)  # fmt: skip


def build(shape, parametrization: str, lr: float, base_width: int, seed: int, weight_decay=0.0):
    """(model, optimizer) for SP or μP, seeded; the optimizer is kiln's AdamW builder."""
    import torch

    from kiln.config import TrainConfig
    from kiln.models.gpt import GPT
    from kiln.models.mup import apply_mup, lr_multiplier
    from kiln.train.optim import build_optimizer

    mult = None
    if parametrization == "mup":
        shape = apply_mup(shape, base_width)
        mult = lr_multiplier(shape)
    torch.manual_seed(seed)
    model = GPT(shape)
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay)
    return model, build_optimizer(model, cfg, mult)


def measure(model, tokens) -> dict[str, float]:
    """Mean |activation| per layer type on ``tokens`` (no gradient)."""
    import torch

    sums: dict[str, list[float]] = {k: [] for k in LAYER_TYPES}

    def record(kind, index=0):
        def hook(_module, args, output):
            x = args[index] if kind == "embedding" else output
            sums[kind].append(float(x.detach().abs().mean()))

        return hook

    handles = [model.blocks["0"].register_forward_hook(record("embedding"))]
    for block in model.blocks.values():
        handles.append(block.attn.register_forward_hook(record("attention")))
        handles.append(block.mlp.register_forward_hook(record("mlp")))
    handles.append(model.register_forward_hook(record("logits")))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return {k: sum(v) / len(v) for k, v in sums.items()}


def coord_check(
    widths: list[int], steps: int = 5, lr: float = 1e-2, batch: int = 4, seq_len: int = 64,
    vocab: int = 1024, base_width: int = 256, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """{'widths', 'sp'/'mup': {layer type: [mean |x| per width]}, 'slopes': {...}}."""
    import torch

    from kiln.models.gpt import cross_entropy

    if len(widths) < 2 or steps < 1:
        raise ConfigError("coord-check needs at least 2 widths and 1 step.")
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (steps + 1, batch, seq_len + 1), generator=g)
    out: dict[str, Any] = {"widths": list(widths), "steps": steps, "lr": lr}
    for param in ("sp", "mup"):
        rows = {k: [] for k in LAYER_TYPES}
        for w in widths:
            model, opt = build(toy_shape(w, vocab, seq_len), param, lr, base_width, seed)
            for t in range(steps):
                x = stream[t]
                cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            for k, v in measure(model, stream[steps][:, :-1]).items():
                rows[k].append(v)
        out[param] = rows
    out["slopes"] = {p: {k: _slope(widths, out[p][k]) for k in LAYER_TYPES} for p in ("sp", "mup")}
    return out


def _slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log2 |x| against log2 width (0 = flat, 1 = ∝ width)."""
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(result: dict[str, Any], out: str | Path, command: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, param, title in zip(axes, ("sp", "mup"), ("standard parametrization", "μP")):
        for k in LAYER_TYPES:
            s = result["slopes"][param][k]
            ax.plot(result["widths"], result[param][k], marker="o", label=f"{k} (slope {s:+.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width d_model")
        ax.set_title(f"{title}: after {result['steps']} Adam steps, lr {result['lr']:g}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean |activation|")
    return save_figure(fig, out, command, dpi=110)


def run_coord_check(widths, steps=5, out="docs/mup-coord-check.png", seed=0, command="", log=print):
    """Run, plot, write ``out`` and ``out``.json, print the slopes."""
    result = coord_check(widths, steps=steps, seed=seed)
    result["command"] = command
    plot(result, out, command)
    Path(out).with_suffix(".json").write_text(json.dumps(result, indent=2))
    for param in ("sp", "mup"):
        slopes = ", ".join(f"{k} {v:+.2f}" for k, v in result["slopes"][param].items())
        log(f"{param:>3}: slope of log2 mean|x| vs log2 width: {slopes}")
    log(f"wrote {out}")
    return result
