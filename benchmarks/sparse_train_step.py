"""Side by side: one full training step of cerebras-gpt-111m, dense vs block-sparse twins.

A step is what ``kiln train`` does: zero grads, forward under bf16 autocast (fp32 master
weights) with the head and cross-entropy fused (the trainer's eager loss function), backward,
the sparsity callback's ``after_backward``, gradient clipping, AdamW (torch's fused
implementation), ``after_optimizer_step``; the process tunes malloc as ``kiln train`` does on CPU
(kiln.train.malloc; ``--no-malloc-tuning`` leaves glibc's defaults). Each sparse twin
(one per ``--densities`` value, all in the same run) is the same model with every
transformer-block matrix (attn wq/wk/wv/wo, mlp w1/w2) at that density in b×b blocks, applied
from outside by kiln.sparsity (build_sparsity: SparseLinear sharing the Parameters, kernel
chosen per shape by timing every candidate, the fused fc1 → GELU → fc2 kernel where it was
timed fastest). With b = 64 the 768×768 attention matrices have 12 blocks per line, so 12.5%
(1.5 per line) needs ``--unbalanced``. Embeddings, norms, biases and the tied 50257-way head stay
dense, so the ideal speed-up is FLOPs_dense / FLOPs_sparse with FLOPs/token = 6 × (weights
multiplied) + 12·L·S·d (attention). Variants are timed alternately, so machine noise hits all
alike; the table gives the median and the fastest round of each. ``--compiled-dense`` adds the
dense twin with ``--train.compile`` (model and loss compiled as one graph), the other candidate
for the fastest dense baseline. The section is written per CPU kind (AMX or not), so one
machine's numbers never replace another's.

    .venv/bin/python benchmarks/sparse_train_step.py --block 64 --unbalanced \
        --densities 0.5 0.25 0.125            # writes its BENCHMARKS.md section
    .venv/bin/python benchmarks/sparse_train_step.py --densities 0.125 --rounds 2 --no-write \
        --profile                             # where each sparse step's time differs from dense
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.profiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_section  # noqa: E402
from kiln.config import SparsityConfig, TrainConfig  # noqa: E402
from kiln.models.gpt import GPT  # noqa: E402
from kiln.models.presets import PRESETS  # noqa: E402
from kiln.sparsity.callback import Runtime, build_sparsity  # noqa: E402
from kiln.train.malloc import keep_freed_memory  # noqa: E402
from kiln.train.optim import build_optimizer  # noqa: E402
from kiln.train.trainer import make_loss_fn  # noqa: E402


def make(seed: int, sparse: SparsityConfig | None, tokens: int, log):
    torch.manual_seed(seed)
    model = GPT(PRESETS["cerebras-gpt-111m"])
    model.init_weights()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    callback = None
    if sparse is not None:
        runtime = Runtime(seed=seed, max_steps=1000, tokens=tokens, precision="bf16")
        callback = build_sparsity(sparse, model, optimizer, runtime, log)
    return model, optimizer, callback


def step_fn(model, optimizer, callback, x, y, compile: bool = False):
    loss_fn = make_loss_fn(model, torch.device("cpu"), "bf16", compile)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = loss_fn(x, y)
        loss.backward()
        if callback is not None:
            callback.after_backward(0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if callback is not None:
            callback.after_optimizer_step(0)
        return time.perf_counter() - start

    return step


def flops_per_token(callback, model, seq: int, sparse: bool) -> float:
    cfg = model.config
    attention = 12 * cfg.n_layers * seq * cfg.n_heads * cfg.d_head
    m = callback.metrics(0)
    return (m["flops_per_token_sparse"] if sparse else m["flops_per_token_dense"]) + attention


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class _FreeMatmul(torch.autograd.Function):
    """A linear whose matmuls cost nothing: zeros out, zero input gradient, and a zero
    dense-shaped weight gradient (what the block kernels write too, so AdamW and clipping
    still see every weight)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.shape, ctx.w = x.shape, weight
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        return dy.new_zeros(ctx.shape), torch.zeros_like(ctx.w)


class FreeLinear(torch.nn.Module):
    """Stands in for a transformer-block matrix in the ``matmuls free`` variant."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        y = _FreeMatmul.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def make_free(seed: int, tokens: int):
    """The dense twin with every transformer-block matrix's matmuls free: the Amdahl bound of
    any sparse kernel (norms, attention, head, AdamW over every weight stay)."""
    model, optimizer, _ = make(seed, None, tokens, print)
    for block in model.blocks.values():
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, FreeLinear(child))
    return model, optimizer, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--densities", type=float, nargs="+", default=[0.5, 0.25, 0.125], help="kept fractions"
    )
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--kernel", default="auto", help="auto, block, masked or dense")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--unbalanced", action="store_true", help="blocks anywhere in a matrix")
    parser.add_argument("--profile", action="store_true", help="profile each step after")
    parser.add_argument("--compiled-dense", action="store_true", help="also time compiled dense")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="glibc malloc defaults")
    parser.add_argument("--no-bound", action="store_true", help="skip the matmuls-free variant")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    tuned = not args.no_malloc_tuning and keep_freed_memory()
    tokens = args.batch * args.seq
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, 50257, (args.batch, args.seq), generator=gen)
    balance = "unbalanced" if args.unbalanced else "balanced"
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    dense = make(0, None, tokens, print)
    steps = {"dense": step_fn(*dense, x, y)}
    if args.compiled_dense:
        steps["dense-compiled"] = step_fn(*make(0, None, tokens, print), x, y, compile=True)
    if not args.no_bound:
        steps["matmuls free"] = step_fn(*make_free(0, tokens), x, y)
    twins, choices = {}, {}
    for density in args.densities:
        name = f"{1 - density:.1%} sparse"
        cfg = SparsityConfig(
            level=1 - density,
            pattern="block",
            block_size=args.block,
            kernel=args.kernel,
            balanced=not args.unbalanced,
        )
        lines: list[str] = []
        twins[name] = make(0, cfg, tokens, lambda m, lines=lines: (print(m), lines.append(m)))
        choices[name] = lines
        steps[name] = step_fn(*twins[name], x, y)
    for _ in range(2):  # warm-up: first-call allocations, compilation, AdamW state, heap growth
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(fn())
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    model, _, cb = next(iter(twins.values()))
    f_dense = flops_per_token(cb, model, args.seq, sparse=False)
    rows = [
        "| variant | step (s): median / fastest | tokens/s (median) | speed-up vs dense: "
        "median / fastest | FLOP-ratio ideal |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "dense": "dense (eager, what `kiln train` runs)",
        "dense-compiled": "dense, `--train.compile` (model + loss one graph)",
        "matmuls free": "bound: the block matrices' matmuls free (zeros; nothing else changed)",
    }
    for name in med:
        ideal = "—"
        if name in twins:
            t_model, _, t_cb = twins[name]
            ideal = f"{f_dense / flops_per_token(t_cb, t_model, args.seq, sparse=True):.2f}×"
        speed = f"{med['dense'] / med[name]:.2f}× / {best['dense'] / best[name]:.2f}×"
        rows.append(
            f"| {labels.get(name, name)} | {med[name]:.2f} / {best[name]:.2f} | "
            f"{tokens / med[name]:,.0f} | "
            + (f"**{speed}**" if name in twins else speed)
            + f" | {ideal} |"
        )
    kernels = "\n".join(
        f"- {name}: " + "; ".join(line.removeprefix("sparsity: ") for line in lines)
        for name, lines in choices.items()
    )
    malloc = (
        "malloc tuned as `kiln train` does (kiln.train.malloc)"
        if tuned
        else "glibc malloc defaults (`--no-malloc-tuning`)"
    )
    amx = has_amx()
    body = (
        f"## Sparse training step on {cpu_name()} (AMX: {'yes' if amx else 'no'}): "
        f"cerebras-gpt-111m, block-sparse twins vs dense\n\n"
        f"Full training step (forward with the fused head + loss, backward, sparsity hooks, "
        f"clipping, fused AdamW; bf16 autocast over fp32 master weights; {malloc}) of "
        f"cerebras-gpt-111m, batch {args.batch} × seq {args.seq} = {tokens} tokens; all "
        f"transformer-block matrices at "
        + ", ".join(f"{1 - d:.1%}" for d in args.densities)
        + f" {balance} {args.block}×{args.block} block sparsity (kernel `{args.kernel}`) vs "
        f"the dense twin, all in one process, {args.rounds} alternating rounds; per-round: "
        + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in ts) for n, ts in times.items())
        + f". Load average (1/5/15 min) before {' '.join(load_before)}, after "
        + f"{' '.join(load_after)} on {torch.get_num_threads()} threads. "
        "The bound row is the dense twin whose 60 transformer-block matrices return zeros and "
        "zero gradients without computing: the most any kernel for them can gain (attention, "
        "norms, the head and AdamW over every weight remain).\n\n"
        + "\n".join(rows)
        + "\n\nThe chooser's lines (every candidate timed on the real shape, fastest first):"
        "\n\n" + kernels
    )
    print(body)
    if not args.no_write:
        write_section("sparse_train_step_amx" if amx else "sparse_train_step", body)
    if args.profile:
        profile(steps)


def profile(steps) -> None:
    """Per op, self CPU time of one step of each variant next to the dense step's (printed,
    not written), the ops whose time differs most first."""
    res = {}
    for name, step in steps.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        res[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    base = res["dense"]
    for name, ops in res.items():
        if name == "dense":
            continue
        print(f"\n{name} vs dense: op, self ms (calls) dense → {name}")

        def diff(k, ops=ops):
            return abs(ops.get(k, (0, 0))[0] - base.get(k, (0, 0))[0])

        for k in sorted(set(base) | set(ops), key=diff, reverse=True)[:20]:
            (d, dn), (s, sn) = base.get(k, (0, 0)), ops.get(k, (0, 0))
            print(f"  {k[:50]:50s} {d:8.1f} ({dn:4d}) → {s:8.1f} ({sn:4d})")
        total = (sum(v[0] for v in base.values()), sum(v[0] for v in ops.values()))
        print(f"  {'total':50s} {total[0]:8.1f}        → {total[1]:8.1f}")


if __name__ == "__main__":
    main()
