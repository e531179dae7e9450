"""Shared benchmark plumbing: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    return (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return f".venv/bin/python {script}{' ' + args if args else ''}"


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the ``<!-- name:start -->`` … ``<!-- name:end -->`` section of
    ``path``, keeping every other section."""
    from kiln.fsio import atomic_write

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block
    atomic_write(path, text.rstrip() + "\n")


def write_section(name: str, body: str) -> None:
    """``replace_section`` with the exact command, the machine and the date appended."""
    stamp = datetime.date.today().isoformat()
    replace_section(
        name,
        f"{body.rstrip()}\n\nCommand: `{command_line()}`  \nMachine: {machine()}  \nDate: {stamp}",
    )


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def train_run(run_dir: Path, flags: list[str], label: str, reuse: bool) -> tuple[dict, list[dict]]:
    """One real ``kiln train`` subprocess into ``run_dir`` (skipped with ``reuse`` when it
    finished before): its summary.json and the records of its metrics.jsonl."""
    import json
    import subprocess
    import time

    summary = run_dir / "summary.json"
    if not (reuse and summary.is_file()):
        args = [sys.executable, "-m", "kiln.cli", "train", "--run.dir", str(run_dir), *flags]
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
        print(f"{label}: {time.perf_counter() - start:.0f}s", flush=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads(summary.read_text()), records
