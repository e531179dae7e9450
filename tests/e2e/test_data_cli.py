"""``kiln data prepare``: prepares once (progress, MB/s, a summary), later runs reuse it; bad
input exits 2 with one sentence and leaves nothing in the cache."""

import gzip
import json

import pytest

from kiln.cli import main
from kiln.data.tokenizer import train_bpe
from tests.e2e.helpers import kiln


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import zstandard

    root = tmp_path_factory.mktemp("data-cli")
    texts = [
        f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * 30 for i in range(40)
    ]
    rows = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (root / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(rows)[:-30])
    tok = train_bpe(texts, 300).save(root / "tok")
    return root, tok


def test_prepare_then_reuse(inputs, kiln_env, tmp_path):
    root, tok = inputs
    args = ["data", "prepare", "--data.corpus", str(root / "corpus.jsonl.zst"),
            "--data.tokenizer", str(tok), "--data.cache_dir", str(tmp_path / "cache"),
            "--data.workers", "2"]  # fmt: skip
    first = kiln(args, kiln_env)
    assert first.returncode == 0, first.stderr
    assert "data: prepared 40 documents" in first.stdout and "MB/s" in first.stdout
    again = kiln(args, kiln_env)
    assert again.returncode == 0 and "reusing token shards" in again.stdout


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--data.corpus", "{root}/cut.jsonl.gz"], "cut.jsonl.gz' cannot be read"),
        (["--data.corpus", "{root}/*.parquet"], "matches no"),
        (["--data.corpus", "{root}/corpus.jsonl.zst:0,builtin:sotu:1"], "must be > 0"),
    ],
)
def test_bad_input_exits_2(inputs, tmp_path, capsys, flags, needle):
    root, tok = inputs
    cache = tmp_path / "cache"
    argv = ["data", "prepare", "--data.tokenizer", str(tok), "--data.cache_dir", str(cache),
            *(f.format(root=root) for f in flags)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_help_and_resume(capsys):
    """Its help is its own (it printed a two-line text of its own before, without the flags);
    --resume, which it ignored before, is refused in one sentence."""
    assert main(["data", "prepare", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kiln data prepare ") and "--data.corpus" in out
    assert "--resume" not in out and "token shards" in " ".join(out.split())
    assert main(["data", "prepare", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data prepare takes a config, not --resume."], err
