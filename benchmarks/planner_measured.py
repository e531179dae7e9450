"""The layout planner against `kiln train` on this machine (docs/planner.md, BENCHMARKS.md).

Every layout below trains the same tiny-but-not-trivial GPT (4 layers, d_model 256, vocab 4096,
untied, 5.3M parameters; fp32; global batch 16 × 128 tokens) for a few steps with ``kiln train``
under torchrun (gloo, 2 or 4 processes on this machine's cores). For each layout it records

* the median step time: global tokens / ``tokens_per_s`` of metrics.jsonl (``log.every 1``),
  over the steps after the first two;
* the peak memory of each rank's training state: the peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the model is built) when the final checkpoint starts,
  less the resident set just before the model is built (the process runtime, the one-off
  buffers of a first tiny forward/backward, gloo, the tokenizer and the data are already
  there), so it counts what kiln.train.memory counts; and the resident set once the model is
  built and parallelised (what the build leaves behind); and, in the raw results, glibc's own
  account when training ends (in use, free but kept in the heap, arenas: :func:`malloc_stats`);

and asks the planner for the same layout on ``local:N`` (this machine with N processes:
:func:`kiln.planning.layout.local_cluster`, in fp32 as the runs train, with each gloo
collective kind measured for N processes at the start: kiln.planning.collectives) through
:func:`kiln.planning.layout.predict_layout` — its memory is ``Prediction.memory['peak']``
(layout_memory → kiln.train.memory) and its step time ``Prediction.step_s``. Layouts run
interleaved, ``--repeats`` rounds in a rotated order, so
that the load other work puts on the machine falls on all of them alike.

    PYTHONPATH=src python benchmarks/planner_measured.py [--repeats 2] [--steps 8]
    PYTHONPATH=src python benchmarks/planner_measured.py --from-json runs/planner_measured.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln.planning.cluster import LOCAL_LINK_GBPS
from kiln.planning.flops import Shape
from kiln.planning.layout import Layout, local_cluster, predict_layout

HERE = Path(__file__).resolve()
SHAPE = Shape(n_layers=4, d_model=256, n_heads=4, d_ffn=1024, vocab_size=4096, max_seq_len=128,
              tie_embeddings=False)  # fmt: skip
SEQ, BATCH = 128, 16
MODEL_FLAGS = ["--model.n_layers", "4", "--model.d_model", "256", "--model.n_heads", "4",
               "--model.d_ffn", "1024", "--model.max_seq_len", "128",
               "--model.tie_embeddings", "false", "--data.vocab_size", "4096",
               "--data.seq_len", str(SEQ), "--train.batch_size", str(BATCH),
               "--train.precision", "fp32", "--train.eval_every", "0",
               "--train.eval_batches", "1", "--log.every", "1", "--log.tensorboard", "false",
               "--log.progress", "false", "--checkpoint.every", "0"]  # fmt: skip


def _lay(tp=1, pp=1, rep=1, shard=1, mb=8, m=1, sched="1F1B", ac=False, data="fsdp") -> Layout:
    return Layout(tp, pp, rep, shard, mb, m, sched, 1, ac, data)


LAYOUTS = [
    _lay(rep=2, mb=8, data="ddp"),
    _lay(shard=2, mb=8),
    _lay(shard=2, mb=8, ac=True),
    _lay(shard=4, mb=4),
    _lay(tp=2, mb=16),
    _lay(pp=2, mb=4, m=4, sched="GPipe"),
    _lay(pp=2, mb=4, m=4, sched="1F1B"),
    _lay(tp=2, pp=2, mb=4, m=4),
    _lay(pp=2, shard=2, mb=2, m=4),
    _lay(rep=2, shard=2, mb=4),
]
"""DDP×2, FSDP×2 (±AC), FSDP×4, TP2, PP2 GPipe and 1F1B, TP2×PP2, PP2×FSDP2, HSDP 2×2."""


def train_flags(lay: Layout) -> list[str]:
    """``kiln train`` flags for ``lay`` (the names of its parallel_yaml section)."""
    flags = [
        "--parallel.data",
        lay.data,
        "--parallel.tensor",
        str(lay.tp),
        "--parallel.pipeline",
        str(lay.pp),
        "--parallel.data_replicate",
        str(lay.dp_replicate if lay.data == "fsdp" else 1),
        "--parallel.activation_checkpointing",
        str(lay.activation_checkpointing).lower(),
    ]
    if lay.pp == 1:  # under PP the schedule splits the local batch into its micro-batches
        flags += ["--train.micro_batch_size", str(lay.micro_batch)]
    else:
        flags += ["--parallel.pipeline_schedule", lay.schedule,
                  "--parallel.microbatches", str(lay.microbatches)]  # fmt: skip
    return flags


def world(lay: Layout) -> int:
    return lay.tp * lay.pp * lay.dp


# -- inside each torchrun process --------------------------------------------------------------
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(out: str, argv: list[str]) -> int:
    """Run ``kiln train`` in this process, recording the training state's peak memory. A
    tiny forward/backward first puts the one-off buffers of torch's first kernels (~45 MB on
    this CPU) into the baseline, as tests/distributed/test_memory_estimate.py does."""
    import torch

    from kiln.cli import main
    from kiln.models.gpt import GPTConfig
    from kiln.train import run
    from kiln.train.trainer import Trainer

    tiny = GPTConfig(n_layers=1, d_model=64, n_heads=1, n_kv_heads=1, d_head=64, d_ffn=64,
                     vocab_size=256, max_seq_len=64)  # fmt: skip
    x, y = torch.randint(0, 256, (2, 2, 32))
    run.build_model(tiny, torch.device("cpu"), 0)(x, targets=y).backward()

    marks: dict[str, int] = {}
    checkpoint, parallel = Trainer._checkpoint, run.build_parallel_model

    def at_checkpoint(self):
        if "peak" not in marks:
            marks["peak"], marks["rss"] = _status("VmHWM"), _status("VmRSS")
            marks["malloc"] = malloc_stats()
        return checkpoint(self)

    def build_parallel_model(*a, **k):  # the build's own high-water mark, and what it left
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        marks["before"] = _status("VmRSS")
        out = parallel(*a, **k)
        marks["built_hwm"], marks["built_rss"] = _status("VmHWM"), _status("VmRSS")
        return out

    Trainer._checkpoint, run.build_parallel_model = at_checkpoint, build_parallel_model
    rc = main(argv)
    rank = os.environ.get("RANK", "0")
    Path(out, f"rank{rank}.json").write_text(json.dumps({**marks, "rc": rc}))
    return rc


def malloc_stats() -> dict:
    """glibc's account when training ends (``mallinfo2``, ``malloc_info``; Linux): bytes of
    the heaps, mmapped, in use, free but kept, and the number of arenas (one per thread that
    allocated, up to 8 per core)."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                    "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    i = libc.mallinfo2()
    libc.open_memstream.restype = ctypes.c_void_p
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    f = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(f))
    libc.fclose(ctypes.c_void_p(f))
    xml = ctypes.string_at(buf, size.value).decode()
    libc.free(buf)
    return {"heap": i.arena, "mmap": i.hblkhd, "used": i.uordblks, "free": i.fordblks,
            "arenas": xml.count("<heap nr=")}  # fmt: skip


# -- the driver --------------------------------------------------------------------------------
def measure(lay: Layout, steps: int, cache: Path, env: dict) -> dict:
    """One `kiln train` run of ``lay``: median step time and per-rank peak memory."""
    with tempfile.TemporaryDirectory(prefix="kiln-planner-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(world(lay)), str(HERE), "--worker", tmp, "--", "train",
               "--run.dir", f"{tmp}/run", "--data.cache_dir", str(cache), *MODEL_FLAGS,
               "--train.max_steps", str(steps), *train_flags(lay)]  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if r.returncode:
            raise RuntimeError(f"{lay.name()} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        lines = Path(tmp, "run/metrics.jsonl").read_text().splitlines()
        tps = [json.loads(x)["tokens_per_s"] for x in lines][2:]
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return {"step_s": [BATCH * SEQ / x for x in tps],
            "mem": [r["peak"] - r["before"] for r in ranks],
            "malloc": [{"rss": r["rss"] - r["before"], **r["malloc"]} for r in ranks],
            "build": [[r["built_hwm"] - r["before"], r["built_rss"] - r["before"]] for r in ranks],
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def predict(lay: Layout, fits: dict[str, list]) -> dict:
    """The planner's prediction of ``lay`` on ``local:N``, in fp32 as the runs train, with
    the collectives measured for N processes at the start of the benchmark."""
    from kiln.planning.collectives import CollectiveFit

    n = world(lay)
    c = local_cluster(n, link_gbps=LOCAL_LINK_GBPS, latency_s=0.0, precision="fp32")
    c = dataclasses.replace(c, collectives=tuple(CollectiveFit(*f) for f in fits.get(str(n), [])))
    p = predict_layout(SHAPE, lay, c, SEQ)
    return {"mem": p.memory["peak"], "step_s": p.step_s, "parts": p.parts}


def measure_links() -> dict[str, list]:
    """Each gloo collective kind fitted as latency + bytes / bandwidth for every process
    count the layouts use (kiln.planning.collectives; cached in this benchmark's KILN_CACHE)."""
    from kiln.planning.collectives import measure_collectives

    fits = {}
    for n in sorted({world(lay) for lay in LAYOUTS}):
        fits[str(n)] = [dataclasses.astuple(f) for f in measure_collectives(n)]
        for kind, g, lat, bw in fits[str(n)]:
            print(f"gloo, {n} processes, groups of {g}: {kind} {lat * 1e3:.2f} ms + "
                  f"{bw / 1e9:.2f} GB/s", flush=True)  # fmt: skip
    return fits


def run_all(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cache = Path(args.cache)
    load = [Path("/proc/loadavg").read_text().strip()]
    fits = measure_links()
    results: dict[str, dict] = {lay.name(): {"step_s": [], "mem": []} for lay in LAYOUTS}
    for rnd in range(args.repeats):
        order = LAYOUTS[rnd % len(LAYOUTS) :] + LAYOUTS[: rnd % len(LAYOUTS)]
        if rnd % 2:
            order = order[::-1]
        for lay in order:
            m = measure(lay, args.steps, cache, env)
            res = results[lay.name()]
            res["step_s"] += m["step_s"]
            res["mem"] = m["mem"] if not res["mem"] else [max(a, b) for a, b in
                                                         zip(res["mem"], m["mem"])]  # fmt: skip
            res["build"] = m["build"]  # per rank: (high-water, resident) once parallelised
            res["malloc"] = m["malloc"]  # per rank: glibc's account when training ends
            print(
                f"round {rnd + 1}: {lay.name():<34} median step "
                f"{statistics.median(m['step_s']):.2f} s, memory MiB "
                f"{[round(x / 2**20) for x in m['mem']]} ({m['wall_s']:.0f} s)",
                flush=True,
            )
    load.append(Path("/proc/loadavg").read_text().strip())
    return {"collectives": fits, "results": results, "steps": args.steps,
            "repeats": args.repeats, "loadavg": load}  # fmt: skip


def table(data: dict) -> tuple[str, dict]:
    """Markdown table of predicted vs measured, and the summary numbers."""
    from scipy.stats import spearmanr

    rows, pm, mm, pt, mt = [], [], [], [], []
    head = (
        "| layout | procs | memory predicted MiB | measured MiB (max rank; min) | error "
        "| step predicted s | measured s (median) |\n|---|---|---|---|---|---|---|"
    )
    for lay in LAYOUTS:
        res, pred = data["results"][lay.name()], predict(lay, data["collectives"])
        mem, step = max(res["mem"]), statistics.median(res["step_s"])
        err = pred["mem"] / mem - 1
        pm.append(pred["mem"]), mm.append(mem), pt.append(pred["step_s"]), mt.append(step)
        rows.append(f"| {lay.name()} | {world(lay)} | {pred['mem'] / 2**20:,.0f} | "
                    f"{mem / 2**20:,.0f}; {min(res['mem']) / 2**20:,.0f} | {err:+.0%} | "
                    f"{pred['step_s']:.2f} | {step:.2f} |")  # fmt: skip
    mem_errs = [abs(p / m - 1) for p, m in zip(pm, mm)]
    summary = {
        "memory_mape": statistics.mean(mem_errs),
        "memory_within_25": sum(e <= 0.25 for e in mem_errs),
        "time_mape": statistics.mean(abs(p / m - 1) for p, m in zip(pt, mt)),
        "spearman": float(spearmanr(pt, mt).statistic),
        "layouts": len(LAYOUTS),
    }
    tail = (f"\nmemory: {summary['memory_within_25']} of {summary['layouts']} layouts within "
            f"25%, MAPE {summary['memory_mape']:.0%}; step time: MAPE "
            f"{summary['time_mape']:.0%}, Spearman rank correlation of predicted and measured "
            f"step times {summary['spearman']:.2f} (scipy.stats.spearmanr)")  # fmt: skip
    return head + "\n" + "\n".join(rows) + "\n" + tail, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all layouts")
    ap.add_argument("--steps", type=int, default=8, help="training steps per run")
    ap.add_argument("--cache", default="/tmp/kiln-planner-data", help="data.cache_dir")
    ap.add_argument("--out", default="runs/planner_measured.json", help="raw results")
    ap.add_argument("--from-json", default=None, help="re-print from saved raw results")
    ap.add_argument("--write", action="store_true", help="update docs/planner.md, BENCHMARKS.md")
    args = ap.parse_args()
    # calibrate the CPU (and let the runs refine it) in a cache of this benchmark's own: a
    # shared cache may hold numbers measured under someone else's load
    os.environ.setdefault("KILN_CACHE", "/tmp/kiln-planner-cache")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = run_all(args)
        from kiln.fsio import atomic_write

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(data, indent=1))
    text, _ = table(data)
    print(text)
    if args.write:
        from benchmarks.common import replace_section, write_section

        write_section("planner-measured", "## Layout planner: predicted vs measured on this "
                      "machine (gloo, 2–4 processes)\n\nSee docs/planner.md for the method. "
                      f"Measured with --repeats {data['repeats']} --steps {data['steps']}.\n\n"
                      + text + _stamp(data))  # fmt: skip
        replace_section("planner-measured", text + _stamp(data), HERE.parent.parent /
                        "docs/planner.md")  # fmt: skip


def _stamp(data: dict) -> str:
    from benchmarks.common import machine

    from kiln.planning.hardware import cpu_matrix_flags

    load = " → ".join(data.get("loadavg", [])) or "not recorded"
    return (f"\n\nMeasured by `PYTHONPATH=src python benchmarks/planner_measured.py --repeats "
            f"{data['repeats']} --steps {data['steps']}` (then `--from-json FILE --write`) "
            f"under `flock /tmp/kiln-bench.lock` on {machine()}; bf16 matrix "
            f"instructions: {cpu_matrix_flags()}; /proc/loadavg before → after: "
            f"{load}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[4:]))
    main()
