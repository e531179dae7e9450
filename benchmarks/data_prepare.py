"""Corpus preparation at scale: ``kiln data prepare`` vs the nanoGPT recipe, side by side.

Writes a synthetic ``.jsonl`` corpus of ``--gb`` GB (random stretches of the built-in English
corpora, 1–20 kB per document; or ``--corpus`` names a real one), a 4096-token byte-level BPE,
then prepares the corpus twice, each in its own process with ``--jobs`` workers:

- **kiln**: ``kiln data prepare`` (streaming, threads encoding in Rust), run under an address
  space cap (``RLIMIT_AS = --cap-gb``): exceeding the cap fails the run, so finishing proves the
  bound for every byte it ever mapped, not only for the samples taken;
- **baseline**: the well-known recipe nanoGPT's ``prepare.py`` follows — Hugging Face
  ``datasets``: ``load_dataset("json")`` (converts to Arrow), ``.map(encode, num_proc=jobs)``
  with the same tokenizer, then the token counts summed and the ids written to one ``.bin``.

Reported: wall time, MB/s of corpus (bytes of the .jsonl), and peak resident memory: the
largest sum of RSS over the process and its children (sampled every 0.2 s) and the largest
single process's ``ru_maxrss``. Both must produce the same number of tokens.

    .venv/bin/python benchmarks/data_prepare.py --gb 2 --jobs 2         # writes BENCHMARKS.md
    .venv/bin/python benchmarks/data_prepare.py --gb 0.05 --no-write    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_section  # noqa: E402

BASELINE = r"""
import sys, numpy as np
from datasets import load_dataset
from tokenizers import Tokenizer
corpus, tok_path, out, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(tok_path)
eos = tok.token_to_id("<|endoftext|>")
ds = load_dataset("json", data_files=corpus, split="train", cache_dir=out + "/hf-cache")

def process(example):
    ids = tok.encode(example["text"], add_special_tokens=False).ids
    ids.append(eos)
    return {"ids": ids, "len": len(ids)}

tokenized = ds.map(process, remove_columns=["text"], num_proc=jobs, desc="tokenizing")
arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
arr = np.memmap(out + "/train.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
idx = 0
n_shards = min(1024, len(tokenized))
for i in range(n_shards):
    batch = tokenized.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
    chunk = np.concatenate(batch["ids"])
    arr[idx : idx + len(chunk)] = chunk
    idx += len(chunk)
arr.flush()
print("TOKENS", arr_len)
"""


def write_corpus(path: Path, gb: float) -> int:
    """A .jsonl of about ``gb`` GB: random 1–20 kB stretches of the built-in corpora."""
    from kiln.data import load_documents

    text = "".join(d.text for d in load_documents("builtin:all"))
    rng = np.random.default_rng(0)
    target = int(gb * 1e9)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            starts = rng.integers(0, len(text) - 20_000, 1000)
            lengths = rng.integers(1_000, 20_000, 1000)
            lines = "".join(
                json.dumps({"text": text[s : s + n]}) + "\n" for s, n in zip(starts, lengths)
            )
            f.write(lines)
            written += len(lines.encode())
    return path.stat().st_size


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict, cap_bytes: int | None = None) -> dict:
    """Run ``cmd``; wall time, peak tree RSS (sampled) and peak single-process ru_maxrss."""

    def limit() -> None:
        if cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=limit,
    )  # fmt: skip
    peak, lines = [0], []

    def sample() -> None:
        while proc.returncode is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    def read() -> None:
        lines.extend(proc.stdout)

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, its waited kids included
    secs = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{out[-3000:]}")
    maxrss = usage.ru_maxrss * 1024
    return {"secs": secs, "tree_rss": peak[0], "max_rss": maxrss, "out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the synthetic corpus")
    ap.add_argument("--corpus", default=None, help="a real .jsonl corpus instead")
    ap.add_argument("--jobs", type=int, default=2, help="workers for both")
    ap.add_argument("--cap-gb", type=float, default=2.0, help="address-space cap for kiln")
    ap.add_argument("--dir", default="/tmp/kiln-bench-data", help="scratch folder")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()

    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / f"corpus-{args.gb:g}gb.jsonl"
    if not corpus.is_file():
        print(f"writing {corpus} ...", flush=True)
        write_corpus(corpus, args.gb)
    size = corpus.stat().st_size
    tok_path = work / "tokenizer-4096.json"
    if not tok_path.is_file():
        from kiln.data import load_documents
        from kiln.data.tokenizer import train_bpe

        train_bpe(load_documents("builtin:all"), 4096).save(work)
        os.replace(work / "tokenizer.json", tok_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    results = {}
    for name in ("baseline", "kiln"):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        print(f"{name}: preparing {size / 1e9:.2f} GB ...", flush=True)
        if name == "kiln":
            cmd = [sys.executable, "-m", "kiln.cli", "data", "prepare", "--data.corpus",
                   str(corpus), "--data.tokenizer", str(tok_path), "--data.cache_dir", str(out),
                   "--data.workers", str(args.jobs)]  # fmt: skip
            r = measure(cmd, env, int(args.cap_gb * 2**30))
            manifest = json.loads(next(out.glob("[0-9a-f]*/manifest.json")).read_text())
            r["tokens"] = manifest["n_tokens"]
        else:
            cmd = [sys.executable, "-c", BASELINE, str(corpus), str(tok_path), str(out),
                   str(args.jobs)]  # fmt: skip
            r = measure(cmd, env)
            r["tokens"] = int(r["out"].split("TOKENS")[-1].split()[0])
        results[name] = r
        print(
            f"{name}: {r['secs']:.1f} s, {size / 1e6 / r['secs']:.2f} MB/s, peak RSS "
            f"{r['tree_rss'] / 2**30:.2f} GiB (tree), {r['max_rss'] / 2**30:.2f} GiB (largest "
            f"process), {r['tokens']:,} tokens",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    if results["kiln"]["tokens"] != results["baseline"]["tokens"]:
        raise SystemExit("the two preparations made different numbers of tokens")
    base = results["baseline"]["secs"]
    rows = [
        f"| {n} | {r['secs']:.0f} | {size / 1e6 / r['secs']:.2f} | {base / r['secs']:.2f}× | "
        f"{r['tree_rss'] / 2**30:.2f} | {r['max_rss'] / 2**30:.2f} |"
        for n, r in (("HF datasets .map(num_proc) (nanoGPT recipe)", results["baseline"]),
                     (f"kiln data prepare (under a {args.cap_gb:g} GiB address-space cap)",
                      results["kiln"]))
    ]  # fmt: skip
    body = (
        f"## Corpus preparation: kiln data prepare vs HF datasets (nanoGPT's recipe)\n\n"
        f"{size / 1e9:.2f} GB `.jsonl` ({'synthetic' if not args.corpus else corpus.name}), "
        f"4096-token byte-level BPE, {results['kiln']['tokens']:,} tokens, {args.jobs} "
        f"workers each.\n\n"
        "| preparation | seconds | MB/s | speed vs baseline | peak RSS, process tree (GiB) "
        "| peak RSS, largest process (GiB) |\n|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        write_section("data_prepare", body)


if __name__ == "__main__":
    main()
