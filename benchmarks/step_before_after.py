"""One dense training step as ``kiln train`` takes it, in this checkout against another one
(e.g. main's), in alternating processes: the before/after of a change to the step on this CPU.

Each process builds the model, applies the attention choice ``kiln train`` would make
(``train.cpu_attention: auto`` where the checkout has it), takes two warm-up steps (and
compiles with ``--compile``), then times ``--steps`` steps (loss, backward, clip, fused AdamW).
Processes alternate between the two checkouts ``--rounds`` times, so machine noise hits both
alike; the best and median step of each checkout are reported with MFU against the bf16
matmul peak measured in the same run.

    .venv/bin/python benchmarks/step_before_after.py --other /path/to/main/src [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from kiln.config import TrainConfig
from kiln.models.gpt import GPT
from kiln.models.presets import PRESETS
from kiln.train.malloc import keep_freed_memory
from kiln.train.optim import build_optimizer
from kiln.train.trainer import clip_grad_norm, make_loss_fn
keep_freed_memory()
batch, seq, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
compile = sys.argv[4] == "1"
cfg = PRESETS["cerebras-gpt-111m"]
torch.manual_seed(0)
model = GPT(cfg)
said = "attention: this checkout has no choice"
try:
    from kiln.models.cpu_attention import apply_cpu_attention
    said = apply_cpu_attention(model, "auto", batch, seq, "bf16", "cpu")
except ImportError:
    pass
opt = build_optimizer(model, TrainConfig())
loss_fn = make_loss_fn(model, torch.device("cpu"), "bf16", compile)
x = torch.randint(0, cfg.vocab_size, (batch, seq))
y = torch.randint(0, cfg.vocab_size, (batch, seq))
def step():
    loss = loss_fn(x, y)
    loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
step(); step()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "attention": said}))
"""


def run(src: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    cmd = [sys.executable, "-c", CHILD, str(args.batch), str(args.seq), str(args.steps),
           "1" if args.compile else "0"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", required=True, help="the other checkout's src/ (e.g. main's)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--section", help="write the lines into this BENCHMARKS.md section")
    ap.add_argument("--label", default="other", help="what the other checkout is, for the record")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parent.parent / "src")
    sys.path.insert(0, here)
    from kiln.models.presets import PRESETS
    from kiln.planning.flops import flops_per_token
    from kiln.planning.hardware import _measure_matmul, cpu_matrix_flags, cpu_model_name

    load = os.getloadavg()[0]
    results: dict[str, list[float]] = {"other": [], "this": []}
    said = {}
    for _ in range(args.rounds):
        for name, src in (("other", args.other), ("this", here)):
            r = run(src, args)
            results[name] += r["times"]
            said[name] = r["attention"]
    peak = max(_measure_matmul("cpu", "bf16", n, 5) for n in (2048, 3072))
    per_token = flops_per_token(PRESETS["cerebras-gpt-111m"], args.seq)
    tokens = args.batch * args.seq
    mode = "torch.compile" if args.compile else "eager"
    lines = []
    lines.append(f"cerebras-gpt-111m, {args.batch} × {args.seq}, bf16, {mode}; {cpu_model_name()} "
          f"({cpu_matrix_flags()}); peak {peak / 1e9:.0f} GFLOP/s measured now; loadavg "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after")  # fmt: skip
    for name in ("other", "this"):
        ts = results[name]
        best, med = min(ts), statistics.median(ts)
        where = args.label if name == "other" else "this checkout"
        lines.append(f"{name:5s} ({where}): best {best * 1e3:.0f} ms "
              f"({tokens * per_token / best / peak:.1%} MFU), median {med * 1e3:.0f} ms "
              f"({tokens * per_token / med / peak:.1%} MFU), {tokens / med:,.0f} tokens/s; "
              f"{said[name]}")  # fmt: skip
    ratio = statistics.median(results["other"]) / statistics.median(results["this"])
    lines.append(f"speed-up of this checkout (medians): {ratio:.2f}×")
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    if args.section:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        title = f"## One dense cerebras-gpt-111m step ({mode}), this checkout vs another"
        write_section(args.section, f"{title}\n\n" + "  \n".join(lines))


if __name__ == "__main__":
    main()
