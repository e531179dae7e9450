"""Shared benchmark plumbing: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
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
