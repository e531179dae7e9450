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


def untrained_run(root: Path) -> Path:
    """``root/run``: a Kiln run of a tiny random GPT with a BPE tokenizer (no training)."""
    import torch

    from kiln.data.corpus import Document
    from kiln.data.tokenizer import train_bpe
    from kiln.interop.load import save_kiln
    from kiln.models.gpt import GPT, GPTConfig
    from kiln.train.load import LoadedModel

    tok = train_bpe([Document("a", "the cat sat on the mat. the dog ran off. " * 30)], 280)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64,
                    vocab_size=tok.vocab_size, max_seq_len=64)  # fmt: skip
    save_kiln(LoadedModel(GPT(cfg).eval(), tok, cfg, root, {}), root / "run", "test")
    return root / "run"
