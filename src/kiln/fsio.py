"""Writing files so that a crash never leaves a half-written one in place.

Every file Kiln writes into a user's directories goes through :func:`atomic_write`: the data is
written to a uniquely named temporary file beside the target, fsynced, then renamed over it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; create parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``atomic_write`` of ``obj`` as JSON."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def save_figure(fig: Any, out: str | Path, caption: str = "", dpi: int = 120) -> Path:
    """Lay out a matplotlib figure, caption it (e.g. with the command that made it), write it
    atomically to ``out`` and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    if caption:
        fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
