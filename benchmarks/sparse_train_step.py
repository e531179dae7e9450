"""Side by side: one full training step of cerebras-gpt-111m, dense vs 87.5% block-sparse.

A step is what ``kiln train`` does: zero grads, forward under bf16 autocast (fp32 master
weights) with the head and cross-entropy fused (the trainer's eager loss function), backward,
the sparsity callback's ``after_backward``, gradient clipping, AdamW (torch's fused
implementation), ``after_optimizer_step``; the process tunes malloc as ``kiln train`` does on CPU
(kiln.train.malloc; ``--no-malloc-tuning`` leaves glibc's defaults). The
sparse twin is the same model with every transformer-block matrix (attn wq/wk/wv/wo, mlp w1/w2)
at 87.5% sparsity in b×b blocks, applied from outside by kiln.sparsity (build_sparsity:
SparseLinear sharing the Parameters, kernel chosen by choose_kernel; GELU MLPs whose w1 and w2
both use block-cpp run the fused fc1 → GELU → fc2 kernel). With b = 64 the 768×768 attention
matrices have 12 blocks per line, so 87.5% (1.5 per line) needs ``--unbalanced``.
Embeddings, norms, biases and the tied 50257-way head stay dense, so the ideal speed-up is
FLOPs_dense / FLOPs_sparse with FLOPs/token = 6 × (weights multiplied) + 12·L·S·d (attention).
Variants are timed alternately, median of the rounds, so machine noise hits both alike.
``--compiled-dense`` adds the dense twin with ``--train.compile`` (model and loss compiled as
one graph), the other candidate for the fastest dense baseline.

    .venv/bin/python benchmarks/sparse_train_step.py            # writes its BENCHMARKS.md section
    .venv/bin/python benchmarks/sparse_train_step.py --block 64 --unbalanced --profile
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
from common import write_section  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--level", type=float, default=0.875)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--kernel", default="auto", help="auto, block or masked")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unbalanced", action="store_true", help="blocks anywhere in a matrix")
    parser.add_argument("--profile", action="store_true", help="profile one sparse step after")
    parser.add_argument("--compiled-dense", action="store_true", help="also time compiled dense")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="glibc malloc defaults")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    tuned = not args.no_malloc_tuning and keep_freed_memory()
    tokens = args.batch * args.seq
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, 50257, (args.batch, args.seq), generator=gen)
    choices: list[str] = []
    sparse_cfg = SparsityConfig(
        level=args.level,
        pattern="block",
        block_size=args.block,
        kernel=args.kernel,
        balanced=not args.unbalanced,
    )
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    dense = make(0, None, tokens, print)
    sparse = make(0, sparse_cfg, tokens, lambda m: (print(m), choices.append(m)))
    steps = {"dense": step_fn(*dense, x, y), "sparse": step_fn(*sparse, x, y)}
    if args.compiled_dense:
        steps["dense-compiled"] = step_fn(*make(0, None, tokens, print), x, y, compile=True)
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
    cb = sparse[2]
    f_dense = flops_per_token(cb, sparse[0], args.seq, sparse=False)
    f_sparse = flops_per_token(cb, sparse[0], args.seq, sparse=True)
    kernels = sorted({line.split("→ kernel ", 1)[1] for line in choices if "→ kernel" in line})
    kernels += [line.split(": ", 1)[1] for line in choices if "fused" in line]
    balance = "unbalanced" if args.unbalanced else "balanced"
    labels = {
        "dense": "dense (eager, what `kiln train` runs)",
        "dense-compiled": "dense, `--train.compile` (model + loss one graph)",
        "sparse": f"{args.level:.1%} block-sparse, b={args.block} {balance}",
    }
    rows = [
        "| variant | step (s, median) | tokens/s | speed-up vs dense | FLOPs/token (fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    for name in ("dense", "dense-compiled", "sparse"):
        if name not in med:
            continue
        flops = f_sparse if name == "sparse" else f_dense
        ratio = f"{med['dense'] / med[name]:.2f}×"
        rows.append(
            f"| {labels[name]} | {med[name]:.2f} | {tokens / med[name]:,.0f} | "
            + (f"**{ratio}**" if name == "sparse" else ratio)
            + f" | {flops / 1e9:.3f} G |"
        )
    fastest = min((n for n in med if n != "sparse"), key=med.get)
    malloc = (
        "malloc tuned as `kiln train` does (kiln.train.malloc)"
        if tuned
        else "glibc malloc defaults (`--no-malloc-tuning`)"
    )
    body = (
        "## Sparse training step: cerebras-gpt-111m, 87.5% block-sparse vs its dense twin\n\n"
        f"Full training step (forward with the fused head + loss, backward, sparsity hooks, "
        f"clipping, fused AdamW; bf16 autocast over fp32 master weights; {malloc}) of "
        f"cerebras-gpt-111m, batch {args.batch} × seq {args.seq} = {tokens} tokens; all "
        f"transformer-block matrices at {args.level:.1%} {balance} {args.block}×{args.block} "
        f"block sparsity vs its dense twin. Ideal (FLOP-ratio) speed-up "
        f"{f_dense / f_sparse:.2f}× (the dense tied 50257-way head and attention remain). "
        f"Median of {args.rounds} alternating rounds; per-round: "
        + "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in ts) for n, ts in times.items())
        + f". Load average (1/5/15 min) before {' '.join(load_before)}, after "
        + f"{' '.join(load_after)} on {torch.get_num_threads()} threads"
        + ".\n\nKernels chosen: "
        + "; ".join(kernels)
        + "\n\n"
        + "\n".join(rows)
        + f"\n\nSparse vs the fastest dense variant ({fastest}): "
        + f"**{med[fastest] / med['sparse']:.2f}×**."
    )
    print(body)
    if not args.no_write:
        write_section("sparse_train_step", body)
    if args.profile:
        profile(steps["sparse"])


def profile(step) -> None:
    """Where one sparse step's time goes: top ops by self CPU time (printed, not written)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
