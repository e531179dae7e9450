"""SambaNova's dataflow analysis, reproduced from Kiln's op-level model (kiln.planning.perf).

For GPT-13B's GEMM → GELU → GEMM (one layer, forward + backward, 2048 tokens, bf16) at weight
sparsity 0, 50, 75, 87.5 and 93.75%:

(a) off-chip bandwidth needed to stay compute-bound, kernel by kernel (KBK) vs fused, against
    each device's bandwidth;
(b) on-chip memory the fused chain needs (kept weights + a 128-token tile) against each
    device's L2 / SRAM;
(c) predicted speed-up over dense KBK per device, with points measured on this machine: the
    cerebras-gpt-111m MLP (768 → 3072 → 768) on TOKENS tokens, dense vs Kiln's block-sparse
    MLP (block 64), forward + backward, medians of interleaved rounds, against the model's
    prediction for the same shape on the calibrated CPU.

    python benchmarks/dataflow.py   # docs/dataflow-panels.png + its BENCHMARKS.md section
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_section  # noqa: E402
from kiln.models.presets import PRESETS
from kiln.planning.hardware import DEVICES, cpu_device, cpu_matrix_flags, cpu_model_name
from kiln.planning.ops import StepShape
from kiln.planning.perf import SPARSITIES, mlp_chain

BW_DEVICES = ["A100", "H100", "H200", "MI300X", "SN40L"]
TOKENS, BLOCK, ROUNDS = 512, 64, 3
COLORS = dict(zip([*BW_DEVICES, "SN30", "CS-2", "cpu"], [f"C{i}" for i in range(8)], strict=True))


def measure_cpu(precision: str) -> dict[float, float]:
    """Seconds per forward + backward of the 111m MLP, dense and block-sparse, interleaved."""
    from kiln.sparsity.kernels import BlockLayout, block_sparse_mlp
    from kiln.sparsity.patterns import block_mask

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    d, f = 768, 3072
    torch.manual_seed(0)
    x = torch.randn(TOKENS, d, dtype=dtype)
    w1, w2 = torch.randn(f, d, dtype=dtype) * 0.02, torch.randn(d, f, dtype=dtype) * 0.02
    b1, b2 = torch.zeros(f, dtype=dtype), torch.zeros(d, dtype=dtype)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    steps = {0.0: lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)}
    for s in SPARSITIES[1:]:
        m1 = block_mask(torch.rand(f, d), 1 - s, BLOCK, axis="cols")
        m2 = block_mask(torch.rand(d, f), 1 - s, BLOCK, axis="rows")
        l1, l2 = BlockLayout.from_mask(m1, BLOCK), BlockLayout.from_mask(m2, BLOCK)
        steps[s] = lambda l1=l1, l2=l2: block_sparse_mlp(x, w1, b1, w2, b2, l1, l2)
    times: dict[float, list[float]] = {s: [] for s in steps}
    for r in range(ROUNDS + 1):
        for s, fn in steps.items():
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            fn().sum().backward()
            if r:
                times[s].append(time.perf_counter() - t0)
    return {s: statistics.median(v) for s, v in times.items()}


def plot(points, cpu_pred, cpu_meas, cpu, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.fsio import save_figure

    xs = [100 * p.sparsity for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    for name in BW_DEVICES:
        dev, c = DEVICES[name], COLORS[name]
        ax.plot(xs, [p.bandwidth_needed(dev, False) / 1e12 for p in points], "--", color=c)
        ax.plot(xs, [p.bandwidth_needed(dev, True) / 1e12 for p in points], "-o", color=c,
                label=name, ms=3)  # fmt: skip
        ax.axhline(dev.offchip_bw / 1e12, color=c, ls=":", lw=1)
    ax.set(yscale="log", xlabel="weight sparsity (%)", ylabel="TB/s",
           title="(a) off-chip bandwidth to stay compute-bound\n"
                 "dashed KBK, solid fused, dotted: the device has")  # fmt: skip
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(xs, [p.onchip_fused / 1e6 for p in points], "-ok", label="fused chain needs")
    for name, dev in DEVICES.items():
        if dev.onchip_bytes:
            ax.axhline(dev.onchip_bytes / 1e6, color=COLORS[name], ls=":", label=name)
    ax.set(
        yscale="log",
        xlabel="weight sparsity (%)",
        ylabel="MB",
        title="(b) on-chip memory for fused execution\n(kept weights + 128-token tile)",
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    for name in BW_DEVICES:
        dev, c = DEVICES[name], COLORS[name]
        base = points[0].time(dev, False)
        ax.plot(xs, [base / p.time(dev, False) for p in points], "--", color=c)
        ax.plot(xs, [base / p.time(dev, True) for p in points], "-", color=c, label=name)
    base = cpu_pred[0].time(cpu, False)
    ax.plot(xs, [base / p.time(cpu, False) for p in cpu_pred], "--", color=COLORS["cpu"],
            label="this CPU, 111m MLP (model)")  # fmt: skip
    ax.plot(xs, [cpu_meas[0.0] / cpu_meas[s] for s in SPARSITIES], "s", color=COLORS["cpu"],
            label="this CPU, measured")  # fmt: skip
    ax.plot(xs, [100 / (100 - x) for x in xs], ":", color="gray", label="1/density")
    ax.set(yscale="log", xlabel="weight sparsity (%)", ylabel="× dense KBK",
           title="(c) predicted speed-up over dense kernel-by-kernel")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, out, "python benchmarks/dataflow.py")


def main() -> None:
    points = mlp_chain(PRESETS["cerebras-gpt-13b"], StepShape(batch=1, seq_len=2048))
    cpu = cpu_device()
    precision = "bf16" if cpu_matrix_flags() in ("AMX", "AVX512-BF16") else "fp32"
    cpu_pred = mlp_chain(PRESETS["cerebras-gpt-111m"], StepShape(1, TOKENS, precision))
    if precision == "fp32":  # the chain's rate is the fp32 one on this CPU
        cpu = cpu.__class__(**{**cpu.__dict__, "peak_bf16": cpu.vector_flops})
    cpu_meas = measure_cpu(precision)
    rows = ["| sparsity | 13B chain GFLOP KBK / fused | GB KBK / fused | on-chip MB (fused) | "
            "need H100 TB/s KBK / fused | CPU 111m MLP: predicted / measured × |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    h100 = DEVICES["H100"]
    for p, q in zip(points, cpu_pred, strict=True):
        pred = cpu_pred[0].time(cpu, False) / q.time(cpu, False)
        meas = cpu_meas[0.0] / cpu_meas[p.sparsity]
        rows.append(
            f"| {p.sparsity:.2%} | {p.flops_kbk / 1e9:,.0f} / {p.flops_fused / 1e9:,.0f} | "
            f"{p.bytes_kbk / 1e9:.2f} / {p.bytes_fused / 1e9:.2f} | {p.onchip_fused / 1e6:,.0f} | "
            f"{p.bandwidth_needed(h100, False) / 1e12:.2f} / "
            f"{p.bandwidth_needed(h100, True) / 1e12:.2f} | {pred:.2f} / {meas:.2f} |"
        )
    out = ROOT / "docs" / "dataflow-panels.png"
    plot(points, cpu_pred, cpu_meas, cpu, out)
    body = "\n".join(rows)
    print(body)
    text = (
        "## Dataflow panels: GPT-13B GEMM → GELU → GEMM over sparsity (model) + CPU points\n\n"
        f"{body}\n\nCPU points: cerebras-gpt-111m MLP, {TOKENS} tokens, {precision}, "
        f"block {BLOCK}, dense `F.linear`/`F.gelu` vs `block_sparse_mlp`, median of {ROUNDS} "
        f"interleaved rounds, on {cpu_model_name()} ({cpu_matrix_flags()}); calibrated "
        f"{cpu.peak_bf16 / 1e9:.1f} GFLOP/s {precision} matmul, "
        f"{cpu.offchip_bw / 1e9:.1f} GB/s copy. Dense seconds: {cpu_meas[0.0]:.3f}. "
        f"Figure: docs/dataflow-panels.png."
    )
    write_section("dataflow_panels", text)


if __name__ == "__main__":
    main()
