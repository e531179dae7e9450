"""Evaluation tasks, named and formatted as lm-evaluation-harness names and formats them.

Every task turns a raw document (one JSON line of the cached Hugging Face split) into an
:class:`Example`: the context(s), the continuations to score and the gold index. Requests are
``(context, target_delimiter + continuation)`` as in lm-eval's ``construct_requests``:

* multiple choice (hellaswag, piqa, arc_*, openbookqa, boolq, sciq, copa): one context, one
  continuation per choice; ``acc`` = argmax log-likelihood, ``acc_norm`` = argmax of
  log-likelihood / len(choice in characters).
* partial scoring (winogrande): each option fills the blank in the context and the common
  suffix after the blank is scored.
* cloze (lambada_openai): context = text without its last word, continuation = " " + last word;
  ``acc`` = the greedy continuation equals it, ``perplexity`` = exp(-mean log-likelihood).
* rolling perplexity (``ppl:FILE``): word / byte / token perplexity of documents in a .txt,
  .jsonl (field "text"), a folder of .txt files, or a Kiln corpus (``ppl:builtin:sotu``).
* a user task: ``path/to/task.yaml`` (or .json) describing a JSONL file (see :func:`user_task`).

Few-shot examples are rendered as lm-eval does: ``text + delimiter + gold`` joined by "\\n\\n".
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, closest


@dataclass
class Example:
    contexts: list[str]
    """One context, or one per choice for partial scoring (winogrande)."""
    continuations: list[str]
    """The choices (without the delimiter), or the single shared suffix for partial scoring."""
    gold: int
    """Index of the correct choice."""

    def shot(self, delimiter: str) -> str:
        """This example as a few-shot demonstration (context + delimiter + gold answer)."""
        if len(self.contexts) > 1:
            return self.contexts[self.gold] + delimiter + self.continuations[0]
        return self.contexts[0] + delimiter + self.continuations[self.gold]


@dataclass
class Task:
    name: str
    kind: str
    """'multiple_choice', 'partial', 'cloze' or 'rolling'."""
    format: Callable[[dict], Example] | None
    metrics: tuple[str, ...]
    eval_split: str = "validation"
    fewshot_split: str | None = "validation"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    source: Path | None = None
    """For user and rolling tasks: where the documents are."""
    fewshot_source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- lm-eval formats -------------------------------------------------------------------------
def _listish(value: Any) -> Any:
    """Cached arrow columns may hold Python reprs of lists/dicts; parse them back."""
    if isinstance(value, str) and value[:1] in "[{":
        return ast.literal_eval(value)
    return value


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    endings = [hellaswag_preprocess(e) for e in _listish(doc["endings"])]
    return Example([query], endings, int(doc["label"]))


def _piqa(doc: dict) -> Example:
    return Example(
        [f"Question: {doc['goal']}\nAnswer:"], [doc["sol1"], doc["sol2"]], int(doc["label"])
    )


def _arc(doc: dict) -> Example:
    choices = _listish(doc["choices"])
    gold = choices["label"].index(doc["answerKey"])
    return Example([f"Question: {doc['question']}\nAnswer:"], list(choices["text"]), gold)


def _openbookqa(doc: dict) -> Example:
    choices = _listish(doc["choices"])
    gold = choices["label"].index(doc["answerKey"].lstrip())
    return Example([doc["question_stem"]], list(choices["text"]), gold)


def _boolq(doc: dict) -> Example:
    label = doc.get("label", doc.get("answer"))
    gold = int(label in (True, 1, "1", "True", "true"))
    return Example(
        [f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"], ["no", "yes"], gold
    )


def _sciq(doc: dict) -> Example:
    text = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return Example([text], choices, 3)


def _copa(doc: dict) -> Example:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    lower = lambda c: " " + c[0].lower() + c[1:]
    text = doc["premise"].strip()[:-1] + f" {connector}"
    return Example([text], [lower(doc["choice1"]), lower(doc["choice2"])], int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    idx = doc["sentence"].index("_")
    contexts = [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
    target = doc["sentence"][idx + 1 :].strip()
    return Example(contexts, [target], {"1": 0, "2": 1}[str(doc["answer"])])


def _lambada(doc: dict) -> Example:
    words = doc["text"].split(" ")
    return Example([" ".join(words[:-1])], [" " + words[-1]], 0)


MC = ("acc", "acc_norm")
TASKS: dict[str, Task] = {
    "hellaswag": Task("hellaswag", "multiple_choice", _hellaswag, MC),
    "piqa": Task("piqa", "multiple_choice", _piqa, MC),
    "winogrande": Task("winogrande", "partial", _winogrande, ("acc",)),
    "lambada_openai": Task(
        "lambada_openai",
        "cloze",
        _lambada,
        ("acc", "perplexity"),
        "test",
        None,
        target_delimiter="",
    ),  # fmt: skip
    "arc_easy": Task("arc_easy", "multiple_choice", _arc, MC),
    "arc_challenge": Task("arc_challenge", "multiple_choice", _arc, MC),
    "openbookqa": Task("openbookqa", "multiple_choice", _openbookqa, MC),
    "boolq": Task("boolq", "multiple_choice", _boolq, ("acc",)),
    "sciq": Task("sciq", "multiple_choice", _sciq, MC),
    "copa": Task("copa", "multiple_choice", _copa, ("acc",)),
}


def cache_dir() -> Path:
    """``$KILN_CACHE/evals`` or ``~/.cache/kiln/evals``."""
    root = os.environ.get("KILN_CACHE")
    return (Path(root) / "evals" if root else Path("~/.cache/kiln/evals")).expanduser()


def read_jsonl(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise KilnError(f"{path} line {n} is not valid JSON ({e.msg}).") from e
            if not isinstance(doc, dict):
                raise KilnError(f"{path} line {n} is a {type(doc).__name__}, not a JSON object.")
            docs.append(doc)
    return docs


def resolve(name: str) -> Task:
    """A Task for a built-in name, ``ppl:PATH`` or a task description file."""
    if name.startswith("ppl:"):
        path = Path(name[4:]).expanduser()
        if name.startswith("ppl:builtin:"):  # a Kiln corpus (kiln.data.corpus), e.g. sotu
            path = Path(name[4:])
        elif not path.exists():
            raise KilnError(f"perplexity source {path} does not exist.")
        return Task(name, "rolling", None, ("word_perplexity", "byte_perplexity",
                    "bits_per_byte", "token_perplexity"), source=path)  # fmt: skip
    if name.endswith((".yaml", ".yml", ".json")):
        return user_task(Path(name).expanduser())
    if name not in TASKS:
        raise KilnError(
            f"unknown task {name!r}{closest(name, TASKS)}; choose from {', '.join(TASKS)}, "
            "ppl:FILE or a task .yaml/.json file."
        )
    return TASKS[name]


def user_task(path: Path) -> Task:
    """A multiple-choice task described by a small YAML/JSON file::

    name: mytask                 # optional (default: the file's stem)
    data: items.jsonl            # one JSON object per line (relative to this file)
    fewshot_data: train.jsonl    # optional; few-shot examples come from here (else: data)
    context: context             # field holding the prompt text
    choices: choices             # field holding the list of answer strings
    gold: gold                   # field holding the index of the correct answer
    target_delimiter: " "        # optional
    """
    import yaml

    if not path.is_file():
        raise KilnError(f"task file {path} does not exist.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KilnError(
            f"task file {path} does not parse ({' '.join(str(e).split())[:120]})."
        ) from e
    if not isinstance(spec, dict) or "data" not in spec:
        raise KilnError(f"task file {path} must be a mapping with at least a 'data' JSONL path.")
    known = {"name", "data", "fewshot_data", "context", "choices", "gold", "target_delimiter"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise KilnError(
            f"task file {path} has unknown key {unknown[0]!r}{closest(unknown[0], known)}."
        )
    keys = {k: spec.get(k, k) for k in ("context", "choices", "gold")}

    def fmt(doc: dict) -> Example:
        missing = [v for v in keys.values() if v not in doc]
        if missing:
            raise KilnError(f"a document of {spec['data']} lacks the field {missing[0]!r}.")
        choices, gold = doc[keys["choices"]], doc[keys["gold"]]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise KilnError(
                f"field {keys['choices']!r} in {spec['data']} must be a list of strings."
            )
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise KilnError(
                f"field {keys['gold']!r} in {spec['data']} must index the choices, got {gold!r}."
            )
        return Example([str(doc[keys["context"]])], choices, gold)

    base = path.parent
    fewshot = spec.get("fewshot_data")
    return Task(
        str(spec.get("name", path.stem)), "multiple_choice", fmt, MC,
        eval_split="data", fewshot_split="fewshot" if fewshot else "data",
        target_delimiter=str(spec.get("target_delimiter", " ")), source=base / spec["data"],
        fewshot_source=base / fewshot if fewshot else None,
    )  # fmt: skip


def load_docs(task: Task, split: str) -> list[dict]:
    """The raw documents of a task's split (cached built-in, or the user's files)."""
    if task.source is not None:
        path = task.fewshot_source if split == "fewshot" else task.source
        if not path.is_file():
            raise KilnError(f"task {task.name} data file {path} does not exist.")
        return read_jsonl(path)
    path = cache_dir() / task.name / f"{split}.jsonl"
    if not path.is_file():
        from kiln.eval.fetch import fetch_evals

        fetch_evals()
    if not path.is_file():
        raise KilnError(f"the eval cache has no {task.name}/{split}.jsonl under {cache_dir()}.")
    return read_jsonl(path)


def rolling_documents(path: Path) -> list[str]:
    """Texts for rolling perplexity: a .txt file (one document), .jsonl ("text"), a folder of
    .txt files, or a built-in Kiln corpus (``builtin:NAME``)."""
    if str(path).startswith("builtin:"):
        from kiln.data.corpus import load_documents

        return [d.text for d in load_documents(str(path))]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise KilnError(f"folder {path} holds no .txt files to measure perplexity on.")
        return [f.read_text(encoding="utf-8") for f in files]
    if path.suffix == ".jsonl":
        docs = read_jsonl(path)
        if any("text" not in d for d in docs):
            raise KilnError(f"every line of {path} needs a 'text' field for perplexity.")
        return [d["text"] for d in docs]
    return [path.read_text(encoding="utf-8")]
