"""Training throughput and MFU: Kiln's GPT vs transformers' GPT2LMHeadModel, side by side.

Both models get the identical shape, batch, sequence length and precision (bf16 autocast with
fp32 master weights, AdamW), and are timed in alternation in one process so that machine noise
hits both alike; the process tunes malloc as ``kiln train`` does on CPU (kiln.train.malloc), for
both, and every optimizer is torch's fused AdamW (what ``kiln train`` builds for plain CPU
parameters). Kiln's eager step is the trainer's: head and loss fused (``model(x, targets=y)``),
attention by ``train.cpu_attention`` — timed with each of its two causal bf16 CPU paths forced
(``--attention both``) or with what ``auto`` measures at start, as ``kiln train`` does.
MFU = achieved model FLOPs (6N + 12·L·S·d per token) / the measured bf16 matmul peak of this
CPU (kiln.planning.hardware), never a table value for another chip.

    .venv/bin/python benchmarks/train_throughput.py            # writes BENCHMARKS.md
    .venv/bin/python benchmarks/train_throughput.py --quick    # small shapes, prints only
    .venv/bin/python benchmarks/train_throughput.py --only-111m --no-hf --attention both \
        --section train_throughput_amx                         # another CPU's own section
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402
from kiln.models.cpu_attention import apply_cpu_attention  # noqa: E402
from kiln.models.gpt import GPT, GPTConfig, cross_entropy  # noqa: E402
from kiln.models.presets import PRESETS  # noqa: E402
from kiln.planning.flops import flops_per_token  # noqa: E402
from kiln.planning.hardware import cpu_matrix_flags, measure_cpu_peak  # noqa: E402
from kiln.train.malloc import keep_freed_memory  # noqa: E402
from kiln.train.trainer import make_loss_fn  # noqa: E402


def kiln_model(shape: GPTConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(shape)
    model.init_weights()
    return model


def hf_model(shape: GPTConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=shape.vocab_size,
        n_positions=shape.max_seq_len,
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        n_inner=shape.d_ffn,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def make_step(model: torch.nn.Module, loss_fn):
    """One optimizer step as the trainer takes it: loss, backward, clip, AdamW."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_loss_fn(model: torch.nn.Module):
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cross_entropy(model(x).logits, y)

    return loss_fn


def measured_peak() -> tuple[float, str]:
    """bf16 matmul peak measured now, in this run (not the cache), best of two sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        flops = max(
            measure_cpu_peak("bf16", Path(tmp) / f"peak{n}.json", size=n, reps=8)
            for n in (2048, 3072)
        )
    return flops, "bf16 matmul measured in this run, best of 2048² and 3072²"


def bench_shape(
    name: str,
    shape: GPTConfig,
    batch: int,
    seq: int,
    reps: int,
    compile: bool,
    hf: bool,
    attention: str,
    model_only: bool = False,
):
    x = torch.randint(0, shape.vocab_size, (batch, seq))
    y = torch.randint(0, shape.vocab_size, (batch, seq))
    contenders = {}
    if hf:
        model = hf_model(shape)
        contenders["transformers GPT2LMHeadModel"] = make_step(model, hf_loss_fn(model))
    cpu = torch.device("cpu")
    modes = ["matmul", "sdpa"] if attention == "both" else [attention]
    variants = [(f"kiln GPT, attention {m}", False, m) for m in modes]
    if compile:
        variants.append(("kiln GPT + torch.compile", True, "auto"))
    if compile and model_only:
        variants.append(("kiln GPT + torch.compile of the model only", "model", "auto"))
    for label, compiled, mode in variants:
        model = kiln_model(shape)
        said = apply_cpu_attention(model, mode, batch, seq, "bf16", "cpu")
        print(f"{label}: {said}", flush=True)
        if mode == "auto":
            label += f" ({'matmul' if 'matmul path' in said else 'sdpa'} attention, auto)"
        if compiled == "model":  # the fused head + loss stays eager, outside the graph
            model.output_hidden = True
            loss_fn = make_loss_fn(torch.compile(model), cpu, "bf16", False)
        else:
            loss_fn = make_loss_fn(model, cpu, "bf16", compiled)
        contenders[label] = make_step(model, loss_fn)
    for step in contenders.values():  # warm-up (and compile)
        step(x, y)
        step(x, y)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(reps):  # alternate so that noise hits every contender alike
        for label, step in contenders.items():
            t0 = time.perf_counter()
            step(x, y)
            times[label].append(time.perf_counter() - t0)
    peak, source = measured_peak()
    per_token = flops_per_token(shape, seq)
    rows = []
    base = statistics.median(next(iter(times.values())))
    for label, ts in times.items():
        t = statistics.median(ts)
        tps = batch * seq / t
        rows.append((name, label, t, tps, tps * per_token / peak, base / t))
    return rows, peak, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes; print, don't write")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' model")
    parser.add_argument("--only-111m", action="store_true", help="skip the 4-layer shape")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "matmul", "both"],
                        help="kiln's causal bf16 CPU attention (train.cpu_attention; both: "
                        "each path forced, side by side)")  # fmt: skip
    parser.add_argument("--section", default="train_throughput", help="BENCHMARKS.md section")
    parser.add_argument("--compile-model-only", action="store_true",
                        help="also time torch.compile of the model alone, the fused head + "
                        "loss eager")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    keep_freed_memory()
    base = PRESETS["cerebras-gpt-111m"]
    shapes = [
        (
            "4 layers, d_model 512",
            base.replace(n_layers=4, d_model=512, n_heads=8, n_kv_heads=8, d_head=64, d_ffn=2048),
            8,
            512,
        ),
        ("cerebras-gpt-111m", base, 4, 512),
    ]
    if args.only_111m:
        shapes = shapes[1:]
    if args.quick:
        shapes = [
            (
                "2 layers, d_model 128",
                base.replace(
                    n_layers=2,
                    d_model=128,
                    n_heads=2,
                    n_kv_heads=2,
                    d_head=64,
                    d_ffn=512,
                    vocab_size=4096,
                ),
                4,
                128,
            )
        ]
    all_rows, peak, source = [], 0.0, ""
    load_before = os.getloadavg()
    for name, shape, batch, seq in shapes:
        rows, peak, source = bench_shape(
            name, shape, batch, seq, args.reps, not args.no_compile, not args.no_hf,
            args.attention, args.compile_model_only,
        )  # fmt: skip
        all_rows += [(*r, batch, seq) for r in rows]
        for r in rows:
            print(
                f"{r[0]:24s} {r[1]:30s} {r[2] * 1e3:9.1f} ms/step {r[3]:9.0f} tok/s "
                f"MFU {r[4]:6.1%}  ×{r[5]:.2f} vs the first row",
                flush=True,
            )
    load = f"loadavg {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    lines = [
        f"## Training throughput: Kiln vs transformers (CPU with {cpu_matrix_flags()}, bf16 "
        "autocast, fused AdamW)",
        "",
        f"Peak: {peak / 1e9:.0f} GFLOP/s ({source}). MFU = tokens/s × (6N + 12·L·S·d) / peak. "
        f"Median of {args.reps} alternating rounds; {load}.",
        "",
        "| shape | batch × seq | implementation | ms/step | tokens/s | MFU | vs first row |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, label, t, tps, mfu, ratio, batch, seq in all_rows:
        lines.append(
            f"| {name} | {batch} × {seq} | {label} | {t * 1e3:.0f} | {tps:,.0f} | {mfu:.1%} | "
            f"{ratio:.2f}× |"
        )
    if not args.quick:
        write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
