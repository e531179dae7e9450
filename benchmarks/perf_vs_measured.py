"""Predicted vs measured time per operator kind for one cerebras-gpt-111m training step on
this CPU (kiln.planning.perf against torch.profiler).

The CPU is calibrated in the same run, just before the step (matmul peak of the step's
precision, copy bandwidth), so machine load hits the calibration and the step alike. The
step is forward + backward (fused loss, kiln.models.loss) + fused AdamW, after one warm-up
step. Measured: self CPU time of every aten op in the profiled step, grouped into the model's
op kinds by name (``GROUPS``); predicted: the KBK per-op costs of the same kinds. The mean
absolute percentage error is over the groups that make up 90% of the measured time.

    python benchmarks/perf_vs_measured.py [--seq-len 512] [--batch 1] [--precision auto]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402
from kiln.models.gpt import GPT
from kiln.models.presets import PRESETS
from kiln.planning.hardware import (
    Device,
    _measure_matmul,
    cpu_matrix_flags,
    cpu_model_name,
    measure_cpu_bandwidth,
    measure_fresh_write_bandwidth,
    measure_kernel_overhead,
)
from kiln.planning.ops import StepShape
from kiln.planning.perf import predict

# model op kinds -> aten op names (substrings) that implement them on CPU
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention + softmax": ("scaled_dot_product", "flash_attention", "aten::_softmax"),
    "norm": ("native_layer_norm",),
    "activation (GELU)": ("aten::gelu",),
    "optimizer": ("adamw", "aten::_foreach"),
    "embedding": ("embedding", "aten::index"),
}
KIND_GROUP = {"matmul": "matmul", "attention": "attention + softmax",
              "softmax": "attention + softmax", "norm": "norm", "activation": "activation (GELU)",
              "optimizer": "optimizer", "embedding": "embedding"}  # fmt: skip
OTHER = "other (adds, casts, copies, loss)"


def group_of(aten_name: str) -> str:
    low = aten_name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return OTHER


def calibrate(precision: str) -> Device:
    """This CPU now: matmul rate of the step's precision (and fp32 for element-wise ops)."""
    size = 1024 if precision == "fp32" else 512
    mm = _measure_matmul("cpu", precision, size, 3)
    fp32 = mm if precision == "fp32" else _measure_matmul("cpu", "fp32", 1024, 3)
    with tempfile.TemporaryDirectory() as tmp:  # fresh, not the cached numbers
        bw = measure_cpu_bandwidth(Path(tmp) / "hw.json", mbytes=256, reps=3)
        overhead = measure_kernel_overhead(Path(tmp) / "hw.json")
        fresh = measure_fresh_write_bandwidth(Path(tmp) / "hw.json", mbytes=256)
    return Device("cpu", mm if precision == "bf16" else fp32, fp32, bw, None, None,
                  f"measured in this run on {cpu_model_name()}", 1.0, fresh, overhead)  # fmt: skip


def measure(cfg, batch: int, seq: int, precision: str) -> tuple[dict[str, float], float, str]:
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - t0
    per_group: dict[str, float] = {}
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::") and "adamw" not in evt.key.lower():
            continue
        g = group_of(evt.key)
        per_group[g] = per_group.get(g, 0.0) + evt.self_cpu_time_total / 1e6
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    names = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} ({e.count})" for e in top)
    return per_group, wall, names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="auto", help="bf16, fp32, or auto (bf16 only with "
                    "AMX or AVX512-BF16; without them bf16 matmuls have no fast path)")  # fmt: skip
    args = ap.parse_args()
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if cpu_matrix_flags() in ("AMX", "AVX512-BF16") else "fp32"
    cfg = PRESETS["cerebras-gpt-111m"]
    dev = calibrate(precision)
    step = StepShape(batch=args.batch, seq_len=args.seq_len, precision=precision)
    report = predict(cfg, step, dev, "cerebras-gpt-111m")
    measured, wall, top = measure(cfg, args.batch, args.seq_len, precision)
    predicted: dict[str, float] = {}
    for c in report.kbk:
        g = KIND_GROUP.get(c.kind, OTHER)
        predicted[g] = predicted.get(g, 0.0) + c.time_s
    total_measured = sum(measured.values())
    rows = ["| op kind | predicted s | measured s | error | share of measured |",
            "|---|---|---|---|---|"]  # fmt: skip
    errors, covered = [], 0.0
    for g, m in sorted(measured.items(), key=lambda kv: -kv[1]):
        p = predicted.get(g, 0.0)
        err = (p - m) / m
        if covered < 0.9 * total_measured:
            errors.append(abs(err))
        covered += m
        rows.append(f"| {g} | {p:.3f} | {m:.3f} | {err:+.0%} | {m / total_measured:.1%} |")
    mape = sum(errors) / len(errors)
    step_err = (report.step_time_kbk - wall) / wall
    summary = (
        f"step: predicted {report.step_time_kbk:.2f} s, measured {wall:.2f} s wall "
        f"({total_measured:.2f} s in aten ops), error {step_err:+.0%}; per-kind MAPE over the "
        f"kinds making up 90% of the time: {mape:.0%} ({len(errors)} kinds). Goal: step within "
        f"15%, per-op under 25%."
    )
    body = "\n".join(rows)
    print(body)
    print(summary)
    write_section(
        "perf_vs_measured",
        "## Performance model vs measurement: cerebras-gpt-111m step on this CPU\n\n"
        f"Micro-batch {args.batch} × {args.seq_len} tokens, {precision}, AdamW (fused), "
        f"kernel by kernel (eager). Calibrated in the run: "
        f"{dev.peak_bf16 / 1e9:.1f} GFLOP/s {precision} matmul, "
        f"{dev.vector_flops / 1e9:.1f} GFLOP/s fp32, {dev.offchip_bw / 1e9:.1f} GB/s copy, "
        f"{dev.fresh_write_bw / 1e9:.2f} GB/s writing fresh pages, "
        f"{dev.kernel_overhead_s * 1e3:.2f} ms per kernel ({cpu_matrix_flags()}).\n\n{body}"
        f"\n\n{summary}\n\nTop aten ops of the measured step (self s, calls): {top}",
    )


if __name__ == "__main__":
    main()
