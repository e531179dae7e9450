"""Predicted vs measured time per operator kind for one cerebras-gpt-111m training step on
this CPU (kiln.planning.perf against torch.profiler).

The CPU is calibrated in the same run, just before the step (matmul peak of the step's
precision, copy bandwidth), so machine load hits the calibration and the step alike. The
step is forward + backward (fused loss, kiln.models.loss) + fused AdamW in the steady state
``kiln train`` runs in: malloc keeps freed memory (kiln.train.malloc), the thread count is
pinned, and three warm-up steps come before the profiled one (``--cold`` for the protocol of
the records before 2026-12-02 15:40: one warm-up step under glibc's default malloc, whose
profiled step page-faults in its large tensors), with causal attention on the path
``kiln train`` measures faster here (``--attention``,
kiln.models.cpu_attention). Measured: self CPU time of every aten op in the profiled step,
grouped into the model's op kinds by name (``GROUPS``); predicted: the KBK per-op costs of the
same kinds. The mean absolute percentage error is over the groups that make up 90% of the
measured time.

    python benchmarks/perf_vs_measured.py [--seq-len 512] [--batch 1] [--precision auto]
        [--attention auto] [--cold] [--write --section perf_vs_measured_amx]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402
from kiln.models.cpu_attention import apply_cpu_attention, choose_cpu_attention
from kiln.models.gpt import GPT
from kiln.models.loss import chunk_rows
from kiln.models.presets import PRESETS
from kiln.planning.hardware import (
    Device,
    _measure_matmul,
    cpu_matrix_flags,
    cpu_model_name,
    measure_cpu_bandwidth,
    measure_elementwise,
    measure_fresh_write_bandwidth,
    measure_gemm_mix,
    measure_kernel_overhead,
)
from kiln.planning.ops import StepShape, training_ops
from kiln.planning.perf import fused_costs, predict
from kiln.train.malloc import keep_freed_memory

# model op kinds -> aten op names (substrings) that implement them on CPU
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm"),
    # the GPT's only batched matmuls are attention's (kiln.models.gpt.attention's matmul path)
    "attention + softmax": ("aten::bmm", "scaled_dot_product", "flash_attention", "aten::_softmax"),
    "norm": ("native_layer_norm",),
    "activation (GELU)": ("aten::gelu",),
    "optimizer": ("adamw", "aten::_foreach"),
    "embedding": ("embedding", "aten::index"),
}
KIND_GROUP = {"matmul": "matmul", "attention": "attention + softmax",
              "softmax": "attention + softmax", "norm": "norm", "activation": "activation (GELU)",
              "optimizer": "optimizer", "embedding": "embedding"}  # fmt: skip
OTHER = "other (adds, casts, copies, loss)"


def group_of(aten_name: str, shapes=(), heads: tuple[int, int, int] = (0, 0, 0)) -> str:
    """The model's op kind an aten op belongs to: by name (``GROUPS``); an element-wise op on
    a ``[batch, heads, seq, ·]`` tensor (attention's scores or heads, copies aside: those are
    the model's head split and merge) is attention's, as the attention path is timed whole."""
    low = aten_name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    if "copy" not in low and any(list(s[:3]) == list(heads) for s in shapes if len(s) == 4):
        return "attention + softmax"  # the causal mask's add, q's scaling: on [B, H, T, ·]
    return OTHER


def _mean_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def calibrate(
    precision: str, tokens: int, d: int, f: int, largest: int = 0, gemms=None
) -> tuple[Device, Device]:
    """This CPU now: (the first calibration, the refined one).

    First (the numbers published before): best-of-3 1024² matmul of the step's precision (and
    fp32 for element-wise ops), best-of-3 copy of 256 MB, fresh-write bandwidth, median tiny
    add as kernel overhead. Refined, for a step that is measured once on a shared machine: the
    *mean* of the step's own MLP GEMM (``[tokens, d] @ [d, f]``) as the matmul rate (with
    ``gemms``: the rate of the step's whole mix of GEMM shapes, :func:`step_gemms`), the mean
    of 64 MB copies as the streaming bandwidth (optimizer, weights), and element-wise
    bandwidth plus per-kernel overhead fitted over adds / GELU / GELU backward at the step's
    own sizes, ``largest`` elements included (the tied embedding's V × d gradient sum:
    :func:`kiln.planning.hardware.measure_elementwise`, means too)."""
    size = 1024 if precision == "fp32" else 512
    mm = _measure_matmul("cpu", precision, size, 3)
    fp32 = mm if precision == "fp32" else _measure_matmul("cpu", "fp32", 1024, 3)
    with tempfile.TemporaryDirectory() as tmp:  # fresh, not the cached numbers
        bw = measure_cpu_bandwidth(Path(tmp) / "hw.json", mbytes=256, reps=3)
        overhead = measure_kernel_overhead(Path(tmp) / "hw.json")
        fresh = measure_fresh_write_bandwidth(Path(tmp) / "hw.json", mbytes=256)
    first = Device("cpu", mm if precision == "bf16" else fp32, fp32, bw, None, None,
                   f"measured in this run on {cpu_model_name()}", 1.0, fresh, overhead)  # fmt: skip
    return first, refine(first, precision, tokens, d, f, largest, gemms)


def step_gemms(cfg, tokens: int) -> list[tuple[int, int, int, bool, int]]:
    """(m, k, n, A transposed, count) of the GEMMs of one dense GPT training step: per layer
    q/k/v/o and the MLP forward, their input gradients and (on transposed views, as autograd
    runs them) their weight gradients; the fused head + loss's chunk GEMMs, input gradient and
    weight gradient (from a contiguous hᵀ) once."""
    d, f, L, V = cfg.d_model, cfg.d_ffn, cfg.n_layers, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    out = []
    for n_out, n_in in ((q, d), (kv, d), (kv, d), (d, q), (f, d), (d, f)):
        out += [(tokens, n_in, n_out, False, L), (tokens, n_out, n_in, False, L),
                (n_out, tokens, n_in, True, L)]  # fmt: skip
    chunk = min(chunk_rows(V), tokens)
    out += [(chunk, d, V, False, -(-tokens // chunk)), (tokens, V, d, False, 1),
            (d, tokens, V, False, 1)]  # fmt: skip
    return out


def refine(first: Device, precision, tokens: int, d: int, f: int, largest: int,
           gemms=None) -> Device:  # fmt: skip
    """The refined calibration (see :func:`calibrate`), measured now; with ``gemms``, the
    matmul rate is that of the step's own mix of GEMM shapes (measure_gemm_mix)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(tokens, d, dtype=dtype), torch.randn(d, f, dtype=dtype)
    mm_mean = 2 * tokens * d * f / _mean_seconds(lambda: a @ b, 10)
    if gemms:
        mm_mean = measure_gemm_mix(gemms, precision)
    fp32_mean = mm_mean
    if precision == "bf16":
        a32, b32 = a.float(), b.float()
        fp32_mean = 2 * tokens * d * f / _mean_seconds(lambda: a32 @ b32, 10)
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    copy_mean = 2 * src.numel() * 4 / _mean_seconds(lambda: dst.copy_(src), 5)
    ew_bw, ew_overhead = measure_elementwise([tokens * d, tokens * f] + [largest] * (largest > 0))
    return dataclasses.replace(first, peak_bf16=mm_mean, vector_flops=fp32_mean,
                               offchip_bw=copy_mean, elementwise_bw=ew_bw,
                               kernel_overhead_s=ew_overhead)  # fmt: skip


def average(before: Device, after: Device) -> Device:
    """Calibrations before and after the step, averaged as times (harmonic mean of rates):
    the machine's load drifts over a step that takes a minute."""
    rate = lambda n: 2 / (1 / getattr(before, n) + 1 / getattr(after, n))  # noqa: E731
    names = ("peak_bf16", "vector_flops", "offchip_bw", "elementwise_bw")
    overhead = (before.kernel_overhead_s + after.kernel_overhead_s) / 2
    return dataclasses.replace(before, **{n: rate(n) for n in names}, kernel_overhead_s=overhead)


def measure(
    cfg, batch: int, seq: int, precision: str, attention: str = "auto", warmups: int = 3
) -> tuple[dict[str, float], float, str, str]:
    """(self seconds per group, wall seconds, top ops, the attention choice) of one step
    after ``warmups`` steps."""
    torch.manual_seed(0)
    model = GPT(cfg)
    said = apply_cpu_attention(model, attention, batch, seq, precision, "cpu")
    print(said, flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmups):
        step()
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    wall = time.perf_counter() - t0
    per_group: dict[str, float] = {}
    heads = (batch, cfg.n_heads, seq)
    for evt in prof.key_averages(group_by_input_shape=True):
        if not evt.key.startswith("aten::") and "adamw" not in evt.key.lower():
            continue
        g = group_of(evt.key, evt.input_shapes, heads)
        per_group[g] = per_group.get(g, 0.0) + evt.self_cpu_time_total / 1e6
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    names = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} ({e.count})" for e in top)
    return per_group, wall, names, said


def attention_rate(cfg, step: StepShape, dev: Device, seconds: float, flash: bool) -> float:
    """Achieved attention FLOP/s of one layer's causal attention, forward + backward, timed at
    the step's shape (``seconds``), in the model's FLOP count for the path the step runs: the
    fused group's (with what the flash kernel recomputes) or the KBK attention matmuls'."""
    ops = training_ops(cfg, step)
    if flash:
        rows = fused_costs(ops, dev, step.tokens, precision=step.precision, groups={"attn"})
        flops = sum(c.flops for c in rows if c.name == "attn (fused)") / cfg.n_layers
    else:
        flops = sum(o.flops for o in ops if o.kind == "attention" and o.scope == "block")
    return flops / seconds


def as_run(report, cfg, flash: bool):
    """``report`` with its KBK costs as the measured step ran them: attention's scores →
    softmax → values as one fused op (kiln.planning.perf.fused_costs) when the step used
    SDPA's flash kernel, every other op kernel by kernel."""
    if not flash:
        return report
    ops = training_ops(cfg, report.step)
    costs = fused_costs(ops, report.device, report.step.tokens, precision=report.step.precision,
                        groups={"attn"})  # fmt: skip
    return dataclasses.replace(report, kbk=costs)


def per_group(report) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in report.kbk:
        g = "attention + softmax" if c.name == "attn (fused)" else KIND_GROUP.get(c.kind, OTHER)
        out[g] = out.get(g, 0.0) + c.time_s
    return out


def errors_table(measured, wall, reports) -> tuple[str, list[str]]:
    """Side-by-side table (one predicted column and error per report) and one summary line
    per report: step error and the MAPE over the kinds making up 90% of the measured time."""
    total = sum(measured.values())
    preds = {name: per_group(r) for name, r in reports.items()}
    head = " | ".join(f"{n} s | {n} error" for n in reports)
    rows = [f"| op kind | measured s | {head} | share of measured |",
            "|---|---|" + "---|---|" * len(reports) + "---|"]  # fmt: skip
    errors: dict[str, list[float]] = {n: [] for n in reports}
    covered = 0.0
    for g, m in sorted(measured.items(), key=lambda kv: -kv[1]):
        cells = []
        for n in reports:
            p = preds[n].get(g, 0.0)
            if covered < 0.9 * total:
                errors[n].append(abs(p - m) / m)
            cells.append(f"{p:.3f} | {(p - m) / m:+.0%}")
        covered += m
        rows.append(f"| {g} | {m:.3f} | {' | '.join(cells)} | {m / total:.1%} |")
    lines = []
    for n, r in reports.items():
        mape = sum(errors[n]) / len(errors[n])
        lines.append(
            f"{n}: step predicted {r.step_time_kbk:.2f} s vs measured {wall:.2f} s wall "
            f"({total:.2f} s in aten ops), error {(r.step_time_kbk - wall) / wall:+.0%}; "
            f"per-kind MAPE over the kinds making up 90% of the time: {mape:.0%} "
            f"({len(errors[n])} kinds)."
        )
    return "\n".join(rows), lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cerebras-gpt-111m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="auto", help="bf16, fp32, or auto (bf16 only with "
                    "AMX or AVX512-BF16; without them bf16 matmuls have no fast path)")  # fmt: skip
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "matmul"],
                    help="causal bf16 CPU attention (train.cpu_attention)")  # fmt: skip
    ap.add_argument("--no-gemm-mix", action="store_true", help="refined matmul rate from the "
                    "MLP GEMM alone, not the step's GEMM shapes (always so in fp32)")  # fmt: skip
    ap.add_argument("--cold", action="store_true", help="one warm-up step under glibc's "
                    "default malloc (the earlier records' protocol), not kiln train's steady "
                    "state")  # fmt: skip
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    ap.add_argument("--section", default="perf_vs_measured", help="BENCHMARKS.md section")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as kiln train pins it
    kept = not args.cold and keep_freed_memory()
    state = (
        "one warm-up step, glibc's default malloc"
        if args.cold
        else f"three warm-up steps, {'malloc keeping freed memory' if kept else 'default malloc'}"
        " (kiln train's steady state)"
    )
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if cpu_matrix_flags() in ("AMX", "AVX512-BF16") else "fp32"
    cfg = PRESETS[args.preset]
    tokens = args.batch * args.seq_len
    largest = cfg.vocab_size * cfg.d_model  # the tied embedding's gradient, V × d
    # the step's own GEMM mix in bf16 (seconds); in fp32 on a slow CPU it would take minutes
    gemms = step_gemms(cfg, tokens) if precision == "bf16" and not args.no_gemm_mix else None
    first, refined = calibrate(precision, tokens, cfg.d_model, cfg.d_ffn, largest, gemms)
    step = StepShape(batch=args.batch, seq_len=args.seq_len, precision=precision)
    reports = {
        "first model": predict(cfg, step, first, args.preset),
        "refined model": predict(cfg, step, refined, args.preset),
    }
    load_before = os.getloadavg()[0]
    mode, times = args.attention, {}
    if precision == "bf16":  # time both paths here: the choice, and the attention calibration
        matmul, times = choose_cpu_attention(args.batch, cfg.n_heads, args.seq_len, cfg.d_head)
        mode = ("matmul" if matmul else "sdpa") if mode == "auto" else mode
    measured, wall, top, said = measure(
        cfg, args.batch, args.seq_len, precision, mode, 1 if args.cold else 3
    )
    flash = "matmul path" not in said
    after = refine(first, precision, tokens, cfg.d_model, cfg.d_ffn, largest, gemms)
    refined = average(refined, after)
    if times:  # the refined model charges attention at the rate measured for its path
        rate = attention_rate(cfg, step, refined, times["sdpa" if flash else "matmul"], flash)
        refined = dataclasses.replace(refined, attention_flops=rate)
    reports = {name: as_run(r, cfg, flash) for name, r in reports.items()}
    reports["refined model"] = as_run(predict(cfg, step, refined, args.preset), cfg, flash)
    body, summary = errors_table(measured, wall, reports)
    print(body)
    print("\n".join(summary))
    if not args.write:
        return
    mm_what = "the step's mix of GEMM shapes" if gemms else "the MLP GEMM"
    load = f"loadavg {load_before:.2f} before the step, {os.getloadavg()[0]:.2f} after"
    write_section(
        args.section,
        f"## Performance model vs measurement: {args.preset} step on this CPU\n\n"
        f"Micro-batch {args.batch} × {args.seq_len} tokens, {precision}, AdamW (fused), "
        f"kernel by kernel (eager; {said}; {state}; {load}). Calibrated in the run: "
        f"{first.peak_bf16 / 1e9:.1f} GFLOP/s {precision} matmul, "
        f"{first.vector_flops / 1e9:.1f} GFLOP/s fp32, {first.offchip_bw / 1e9:.1f} GB/s copy, "
        f"{first.fresh_write_bw / 1e9:.2f} GB/s writing fresh pages, "
        f"{first.kernel_overhead_s * 1e3:.2f} ms per kernel (median tiny add) for the first "
        f"model. The refined model is calibrated before and after the step (averaged as "
        f"times) with means at the step's own sizes: "
        f"{refined.peak_bf16 / 1e9:.1f} GFLOP/s for {mm_what}, "
        f"{refined.offchip_bw / 1e9:.2f} GB/s copying 64 MB, element-wise kernels "
        f"{refined.elementwise_bw / 1e9:.2f} GB/s + {refined.kernel_overhead_s * 1e3:.2f} ms "
        f"per kernel (fitted, V × d included), attention at "
        f"{(refined.attention_flops or refined.peak_bf16) / 1e9:.0f} GFLOP/s (its path timed "
        f"at the step's shape, model FLOP count); it also counts the bias gradients as their own "
        f"kernels and the norms' two backward passes ({cpu_matrix_flags()}).\n\n{body}\n\n"
        + "  \n".join(summary)
        + f"\n\nGoal: step within 15%, per-op under 25%.\n\nTop aten ops of the measured "
        f"step (self s, calls): {top}",
    )


if __name__ == "__main__":
    main()
