"""Fixtures for the multi-process tests: the e2e corpus and environment, free ports, and a
torchrun launch of the CLI."""

import socket
import subprocess
import sys

import numpy as np

from tests.e2e.conftest import cache_env, corpus, kiln_env  # noqa: F401  (re-exported fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node n -m kiln.cli ARGS``, output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), "-m", "kiln.cli", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def chain_equals_uninterrupted(root, chain, flags, env: dict) -> dict:
    """``kiln train`` carried through ``chain`` [(processes, layout flags, last step)] in
    ``root/chain`` (the first launch starts it, each later one resumes it with new degrees,
    torchrun when processes > 1), against one uninterrupted process in ``root/ref``; the
    chain checkpoints every 2 steps. Checks that every launch resumed the checkpoint before it
    and saved with its own world size, that every step's loss is within 1e-5 relative and
    every model and optimizer-state tensor at the end within 1e-5. ``flags(run, last)``: the
    flags of a run ending at step ``last``. Returns the reference's final tensors."""
    import json

    from kiln.train.checkpoint import read_meta, read_tensors
    from tests.e2e.helpers import kiln

    ref, run, end = root / "ref", root / "chain", chain[-1][2]
    result = kiln(["train", *flags(ref, end)], env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, (n, layout, last) in enumerate(chain):
        args = ["train", *flags(run, last), *layout, *(["--resume"] if i else [])]
        result = kiln(args, env, timeout=600) if n == 1 else torchrun(n, args, env)
        assert result.returncode == 0, (layout, result.stderr[-3000:])
        if i:
            assert f"step-{last - 2:07d}" in result.stdout, layout
        assert read_meta(run / f"checkpoints/step-{last:07d}")["world_size"] == n, layout

    def losses(r):
        lines = (r / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    np.testing.assert_allclose(losses(run), losses(ref), rtol=1e-5, atol=0)
    a = read_tensors(ref / f"checkpoints/step-{end:07d}")
    b = read_tensors(run / f"checkpoints/step-{end:07d}")
    compared = [k for k in a if k.startswith(("model.", "optim.state."))]
    assert any(k.endswith("exp_avg_sq") for k in compared) and set(compared) <= b.keys()
    for name in compared:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= 1e-5, (name, diff)
    return a
