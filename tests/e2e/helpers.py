"""Shared helpers for end-to-end tests."""

import subprocess
import sys
from pathlib import Path


def tiny_flags(run_dir: Path, corpus: Path, steps: int = 30) -> list[str]:
    return [
        "--run.dir",
        str(run_dir),
        "--data.corpus",
        str(corpus),
        "--data.vocab_size",
        "300",
        "--data.seq_len",
        "32",
        "--model.n_layers",
        "2",
        "--model.d_model",
        "32",
        "--model.n_heads",
        "2",
        "--model.d_ffn",
        "64",
        "--model.max_seq_len",
        "64",
        "--train.batch_size",
        "8",
        "--train.max_steps",
        str(steps),
        "--train.lr",
        "1e-2",
        "--train.eval_every",
        "10",
        "--train.eval_batches",
        "2",
        "--checkpoint.every",
        "10",
        "--log.every",
        "5",
        "--log.progress",
        "false",
        "--train.precision",
        "fp32",
    ]


def kiln(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
