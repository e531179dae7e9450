import os
from pathlib import Path

import pytest

TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A journey of a thousand miles begins with a single step. "
    "To be, or not to be, that is the question. "
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small deterministic English corpus as a folder of .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        words = TEXT.split()
        body = " ".join(words[(i * 7 + j) % len(words)] for j in range(1200))
        (root / f"doc{i:02d}.txt").write_text(body + "\n")
    return root


@pytest.fixture(scope="session")
def kiln_env(tmp_path_factory) -> dict:
    env = dict(os.environ)
    env["KILN_CACHE"] = str(tmp_path_factory.mktemp("kiln-cache"))
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture
def cache_env(kiln_env, monkeypatch):
    """kiln_env's KILN_CACHE for commands run in-process (``kiln.cli.main``)."""
    monkeypatch.setenv("KILN_CACHE", kiln_env["KILN_CACHE"])
