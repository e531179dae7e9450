"""The largest GPT that trains under a fixed memory cap per process, by layout.

A family of GPTs grows d_model and depth together (size k: d_model 64·k, 2·k layers, heads of
32, d_ffn 4·d, an untied 4096-word vocabulary, as the presets grow width and depth together).
For each layout on ``--nproc`` gloo processes — DDP, FSDP2, FSDP2 + activation checkpointing,
TP2 × FSDP2, PP2 × FSDP2 (1F1B) — the memory estimate (kiln.train.memory.estimate_layout_memory,
the one `kiln estimate-memory` prints, build transient included) proposes the largest size
whose peak per rank fits the cap; real runs (kiln.train.memory_probe: kiln's own meta build →
parallelize → Trainer.train_step, peak resident-set increase of the worst rank) then decide:
smaller sizes while the run does not fit, larger ones while it does, so the chosen size fits
and the next one up was measured not to. Every rank runs with ``KILN_MALLOC_TUNING=memory``
(``--malloc``): freed blocks go back to the kernel, the setting for a run under a memory cap
(kiln.train.malloc; the default keeps them and fragments FSDP2's heap).

On CPU, FSDP2 always runs with CPUOffloadPolicy (gloo needs it): the "device" is the CPU, so
offloading moves nothing and saves nothing — there is no separate offload row.

    .venv/bin/python benchmarks/memory_study.py --cap-mib 256 --write
"""

from __future__ import annotations

import argparse
import time

from kiln.config import ParallelConfig
from kiln.models.gpt import GPTConfig
from kiln.train.memory import estimate_layout_memory
from kiln.train.memory_probe import Probe, measure_peaks

LAYOUTS = {
    "DDP": ParallelConfig(data="ddp"),
    "FSDP2": ParallelConfig(),
    "FSDP2 + AC": ParallelConfig(activation_checkpointing=True),
    "TP2 × FSDP2": ParallelConfig(tensor=2),
    "PP2 × FSDP2 (1F1B)": ParallelConfig(pipeline=2, pipeline_schedule="1F1B"),
}


def family(k: int, vocab: int, seq_len: int) -> GPTConfig:
    d = 64 * k
    return GPTConfig(n_layers=2 * k, d_model=d, n_heads=2 * k, n_kv_heads=2 * k, d_head=32,
                     d_ffn=4 * d, vocab_size=vocab, max_seq_len=seq_len, position="learned",
                     norm="layernorm", activation="gelu", bias=True,
                     tie_embeddings=False)  # fmt: skip


def estimate(shape: GPTConfig, cfg: ParallelConfig, nproc: int, batch: int, seq: int,
             heap_kept: bool = True) -> int:  # fmt: skip
    dp = nproc // (cfg.tensor * cfg.pipeline)
    ranks = estimate_layout_memory(shape, seq, batch // dp, "fp32", nproc, cfg,
                                   heap_kept=heap_kept)  # fmt: skip
    return max(e.peak_with_build for e in ranks)


def largest(cfg: ParallelConfig, cap: int, args) -> int:
    """The largest family size k whose estimated peak per rank fits ``cap`` (0 if none)."""
    best = 0
    for k in range(1, args.max_k + 1):
        if estimate(family(k, args.vocab, args.seq_len), cfg, args.nproc, args.batch,
                    args.seq_len, args.malloc != "memory") <= cap:  # fmt: skip
            best = k
    return best


def measure(k: int, cfg: ParallelConfig, args) -> int:
    probe = Probe(family(k, args.vocab, args.seq_len), cfg, args.nproc, args.batch,
                  args.seq_len, steps=args.steps, malloc=args.malloc)  # fmt: skip
    return max(measure_peaks([probe])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap-mib", type=float, default=256.0)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-k", type=int, default=24)
    ap.add_argument("--estimate-only", action="store_true", help="no real runs")
    ap.add_argument(
        "--malloc",
        default="memory",
        choices=["memory", "1"],
        help="KILN_MALLOC_TUNING of every rank: 'memory' returns freed blocks to "
        "the kernel (the low-peak setting), '1' keeps them (kiln train's default)",
    )
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    cap = int(args.cap_mib * 2**20)
    rows = []
    for name in args.layouts.split(","):
        cfg = LAYOUTS[name]
        k = largest(cfg, cap, args)
        meas, t0, runs = None, time.time(), {}
        if not args.estimate_only and k:
            # real runs decide: down while the estimate's pick does not fit, up while it does
            runs[k] = measure(k, cfg, args)
            while runs[k] > cap and k > 1:
                k -= 1
                runs[k] = measure(k, cfg, args)
            while runs[k] <= cap and k < args.max_k:
                if k + 1 not in runs:
                    runs[k + 1] = measure(k + 1, cfg, args)
                if runs[k + 1] > cap:
                    break
                k += 1
            meas = runs[k]
        shape = family(k, args.vocab, args.seq_len)
        est = estimate(shape, cfg, args.nproc, args.batch, args.seq_len, args.malloc != "memory")
        over = runs.get(k + 1)
        n = shape.num_params(include_embeddings=True)
        rows.append((name, k, shape, n, est, meas, over))
        print(f"{name:20} k={k:2} d={shape.d_model:4} L={shape.n_layers:2} params {n / 1e6:7.2f}M "
              f"est {est / 2**20:7.1f} MiB  measured "
              f"{'-' if meas is None else f'{meas / 2**20:.1f}'} MiB ({time.time() - t0:.0f}s)",
              flush=True)  # fmt: skip
    table = format_rows(rows, args)
    print(table)
    if args.write:
        from common import write_section

        write_section("memory-study", "## Memory study: the largest GPT under a memory cap per "
                      f"process\n\n{table}\n")  # fmt: skip


def format_rows(rows, args) -> str:
    ddp = next((r[3] for r in rows if r[0] == "DDP"), rows[0][3])
    lines = [f"cap {args.cap_mib:g} MiB per process, {args.nproc} gloo processes, global batch "
             f"{args.batch} × {args.seq_len} tokens, fp32, AdamW, KILN_MALLOC_TUNING="
             f"{args.malloc}\n",
             "| layout | largest size | parameters | × DDP | estimated peak/rank (MiB) | "
             "measured peak/rank (MiB) | next size up, measured (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, k, shape, n, est, meas, over in rows:
        m = "not run" if meas is None else f"{meas / 2**20:.1f}"
        up = "not run" if over is None else f"{over / 2**20:.1f} (k={k + 1})"
        lines.append(f"| {name} | d {shape.d_model}, {shape.n_layers} layers | {n / 1e6:.2f}M | "
                     f"{n / ddp:.1f}× | {est / 2**20:.1f} | {m} | {up} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
