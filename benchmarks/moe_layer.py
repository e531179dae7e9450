"""Side-by-side: one MoE layer (grouped GEMM, per-expert loop) vs the dense MLP of equal active
FLOPs, forward + backward on CPU.

SwiGLU MLPs, d_model 512; MoE: 8 experts of width 704, top-2 (Mixtral-style routing); dense:
one MLP of width 2 × 704 = 1408, so both do the same expert matmul FLOPs per token
(3 matrices · 2 · d · 1408 forward, ×3 with backward); the MoE layer adds the router
(2·d·E per token, 1% of it) and the dispatch: top-k, sort, gather, scatter-add. 4 × 512 = 2048
tokens. Variants: ``dense``; ``moe-grouped`` (torch._grouped_mm); ``moe-padded`` (rows
zero-padded per expert to a multiple of 32, one torch.bmm per matrix); ``moe-loop`` (one matmul
per expert); ``moe-auto`` (kernel 'auto': whichever of the three timed fastest at first use);
``experts-grouped`` / ``experts-padded`` (only the expert MLPs on pre-sorted rows, in the
compute dtype as the layer passes them, weight casts included: what the MoE layer costs without
routing, to separate the two). Every variant runs once per round,
rounds interleaved, median reported, timed as 1-thread CPU time (time.thread_time), which a
loaded machine distorts far less than wall-clock. The process tunes malloc as ``kiln train``
does on CPU (kiln.train.malloc: freed memory is kept, so a step does not page-fault its
tensors in again; ``--no-malloc-tuning`` leaves glibc's defaults). Goal (the issue's):
moe-grouped within 1.3× of dense.

    python benchmarks/moe_layer.py     # fp32, and bf16 autocast over fp32 weights (as kiln train)
    python benchmarks/moe_layer.py --section moe-layer-amx   # a separate section per machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_section  # noqa: E402
from kiln.config import MoEConfig  # noqa: E402
from kiln.models import moe_kernels  # noqa: E402
from kiln.models.gpt import GPTConfig, SwiGLUMLP  # noqa: E402
from kiln.models.moe import MoE  # noqa: E402
from kiln.train.malloc import keep_freed_memory  # noqa: E402

D, E, K, F_E, TOKENS = 512, 8, 2, 704, 2048
MALLOC = {True: "malloc tuned as `kiln train` does (kiln.train.malloc)",
          False: "glibc malloc defaults (`--no-malloc-tuning`)"}  # fmt: skip
KERNELS = ("grouped", "padded", "loop", "auto")
COLUMNS = ("dense", "moe-grouped", "moe-padded", "moe-loop", "moe-auto", "experts-grouped",
           "experts-padded")  # fmt: skip


def shape(kernel: str) -> GPTConfig:
    return GPTConfig(
        n_layers=1, d_model=D, n_heads=8, n_kv_heads=8, d_head=64, d_ffn=K * F_E,
        vocab_size=256, max_seq_len=512, position="rope", norm="rmsnorm", activation="swiglu",
        bias=False, moe=MoEConfig(experts=E, top_k=K, d_expert=F_E, normalize_top_k=True,
                                  kernel=kernel),
    )  # fmt: skip


def build(autocast: bool) -> dict:
    """fp32 weights and inputs; with ``autocast`` the matmuls run in bf16 (as kiln train)."""
    dtype = torch.float32
    torch.manual_seed(0)
    dense = SwiGLUMLP(shape("auto")).to(dtype)
    moes = {}
    for kernel in KERNELS:
        torch.manual_seed(0)
        m = MoE(shape(kernel))
        m.init_weights(0.02, 0.02)
        moes[kernel] = m.to(dtype).train()
    x = torch.randn(TOKENS, D, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        sorted_counts = moes["grouped"].route(x)[1].flatten().bincount(minlength=E)
    # the MoE layer hands the experts its rows already in the compute dtype
    rows = torch.randn(TOKENS * K, D, dtype=torch.bfloat16 if autocast else dtype)
    rows.requires_grad_()
    padded = moes["padded"].experts
    experts = moes["grouped"].experts

    def step(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = fn()
            y.backward(torch.ones_like(y))

        return run

    return {
        "dense": step(lambda: dense(x)),
        "moe-grouped": step(lambda: _moe(moes["grouped"], x)),
        "moe-padded": step(lambda: _moe(moes["padded"], x)),
        "moe-loop": step(lambda: _moe(moes["loop"], x)),
        "moe-auto": step(lambda: _moe(moes["auto"], x)),
        "experts-grouped": step(lambda: experts(rows, sorted_counts)),
        "experts-padded": step(lambda: padded(rows, sorted_counts)),
    }


def _moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    layer.aux_loss = None  # the balancing loss is not part of the timed layer
    return y


def _choice(dtype: torch.dtype) -> str:
    """The kernel (and timings) kernel 'auto' chose for the expert shape in ``dtype``."""
    for key, (kernel, reason) in moe_kernels._CHOICES.items():
        if key[-2] == dtype and key[0] == E:
            return f"{kernel} ({reason})"
    return "?"


def timed_rounds(runs: dict, reps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--note", default="", help="a sentence appended to the section")
    parser.add_argument(
        "--section", default="moe-layer", help="BENCHMARKS.md section (one per machine)"
    )
    parser.add_argument("--no-malloc-tuning", action="store_true", help="glibc malloc defaults")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tuned = not args.no_malloc_tuning and keep_freed_memory()
    flops = 3 * 2 * 3 * TOKENS * D * K * F_E
    lines = [
        f"One MoE layer vs the dense MLP of equal active FLOPs (d_model {D}, {E} SwiGLU "
        f"experts of width {F_E}, top-{K}; dense width {K * F_E}; {TOKENS} tokens), forward + "
        f"backward, median of {args.reps} interleaved rounds of 1-thread CPU time "
        f"({flops / 1e9:.1f} GFLOP of expert matmuls each); {MALLOC[tuned]}:",
        "",
        "| precision | " + " | ".join(COLUMNS) + " | grouped / dense | padded / dense "
        "| loop / dense | auto / dense | auto chose |",
        "|---" * (len(COLUMNS) + 6) + "|",
    ]
    for autocast in [p.strip() == "bf16" for p in args.precisions.split(",")]:
        t = timed_rounds(build(autocast), args.reps)
        name = "bf16 autocast" if autocast else "fp32"
        ratios = [t[f"moe-{k}"] / t["dense"] for k in KERNELS]
        chose = _choice(torch.bfloat16 if autocast else torch.float32)
        lines.append(
            f"| {name} | " + " | ".join(f"{t[c] * 1e3:.0f} ms" for c in COLUMNS) + " | "
            + " | ".join(f"{r:.2f}×" for r in ratios) + f" | {chose} |"
        )  # fmt: skip
        print(lines[-1], flush=True)
    body = "\n".join(lines) + (f"\n\n{args.note}" if args.note else "")
    print(body)
    if not args.no_write:
        title = f"### MoE layer vs dense MLP (CPU: {cpu_name()})"
        write_section(args.section, f"{title}\n\n{body}")


if __name__ == "__main__":
    main()
