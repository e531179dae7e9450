"""Data step: corpora, tokenizer, shard cache and the resumable data-parallel loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.config import DataConfig
from kiln.data import Tokenizer, TokenLoader, load_documents, prepare_data, val_batches
from kiln.data.corpus import Document
from kiln.data.shards import split_documents, unigram_entropy
from kiln.data.tokenizer import EOS, train_bpe
from kiln.errors import DataError

TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n"
)


def _corpus(tmp_path: Path, n: int = 12, extra: str = "") -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}. {TEXT * (1 + i % 3)}{extra}")
    rows = [json.dumps({"text": f"A jsonl line {i}. {TEXT}"}) for i in range(3)]
    (d / "sub" / "more.jsonl").write_text("\n".join(rows) + "\n")
    return d


def _cfg(tmp_path: Path, corpus: Path | str, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 300)
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe([Document("t", TEXT * 4 + "héllo wörld ünïcode 日本語 🙂")], 300)


# --- corpus --------------------------------------------------------------------------------


def test_local_corpus_is_sorted_and_mixes_txt_and_jsonl(tmp_path):
    d = _corpus(tmp_path, n=3)
    docs = load_documents(f"{d},{d / 'doc00.txt'}")
    names = [Path(n.split(":")[0]).name for n, _ in docs]
    assert names == ["doc00.txt", "doc01.txt", "doc02.txt", *["more.jsonl"] * 3, "doc00.txt"]
    assert docs[3].text.startswith("A jsonl line 0.")


@pytest.mark.parametrize(
    ("files", "target", "match"),
    [
        ({}, "missing", "does not exist"),
        ({}, "", "holds no text"),
        ({"notes.md": "text"}, "", "holds no text"),
        ({"e.txt": "  \n"}, "e.txt", "holds no text"),
        ({"b.jsonl": '{"text": "ok"}\nnot json\n'}, "b.jsonl", r"b\.jsonl:2"),
        ({"c.jsonl": '{"txt": "x"}\n'}, "", r"c\.jsonl:1"),
    ],
)
def test_corpus_errors(tmp_path, files, target, match):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_documents(str(tmp_path / target))


def test_unknown_builtin_suggests_closest():
    with pytest.raises(DataError, match="did you mean 'shakespeare'"):
        load_documents("builtin:shakespear")


def test_builtin_shakespeare_reads_like_a_play():
    docs = load_documents("builtin:shakespeare")
    assert len(docs) > 30 and docs == load_documents("builtin:shakespeare")
    romeo = next(d.text for d in docs if "romeo-and-juliet" in d.name)
    assert "ROMEO:\n" in romeo and "**" not in romeo and "\\[" not in romeo
    assert "[Enter SAMPSON and GREGORY" in romeo


def test_builtin_sotu_and_all():
    speeches = load_documents("builtin:sotu")
    assert len(speeches) > 200 and speeches[0].text.startswith("Fellow-Citizens")
    both = load_documents("builtin:all")
    assert len(both) == len(speeches) + len(load_documents("builtin:shakespeare"))


# --- tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s", ["plain ASCII, with  spaces\n\tand tabs", "héllo wörld — 日本語 🙂 ünseen ✓", ""]
)
def test_tokenizer_round_trip(tok, s):
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch([s, s]) == [tok.encode(s)] * 2


def test_tokenizer_eos_and_save_load(tok, tmp_path):
    assert tok.encode(EOS) == [tok.eos_id] and tok.vocab_size == 300
    loaded = Tokenizer.load(tok.save(tmp_path))
    assert Tokenizer.load(tmp_path).encode(TEXT) == loaded.encode(TEXT) == tok.encode(TEXT)


@pytest.mark.parametrize("names", [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")])
def test_gpt2_format_files_load(tok, tmp_path, names):
    model = json.loads(tok.to_json())["model"]
    (tmp_path / names[0]).write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / names[1]).write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    gpt2 = Tokenizer.load(tmp_path)
    s = "Romeo, wherefore art thou? 日本 🙂"
    assert gpt2.encode(s) == tok.encode(s) and gpt2.decode(gpt2.encode(s)) == s
    assert gpt2.eos_id == tok.eos_id


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(DataError, match="neither tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_bpe_training_is_deterministic():
    docs = [Document(str(i), f"{TEXT} number {i}") for i in range(5)]
    assert train_bpe(docs, 300).to_json() == train_bpe(docs, 300).to_json()


# --- shards --------------------------------------------------------------------------------


def test_prepare_data_caches_and_reuses(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, _corpus(tmp_path))
    first = prepare_data(cfg, log=lambda _: None)
    assert not first.reused
    m = first.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 300 and m["split_by"] == "documents"
    assert m["splits"]["train"]["n_tokens"] == len(first.train) and len(first.val) > 0
    assert len(first.val) <= 0.1 * (len(first.train) + len(first.val))
    assert [s["file"] for s in m["shards"]] == ["tokens-00000.bin"]
    assert m["val_unigram_entropy_nats"] == pytest.approx(unigram_entropy(first.val, 300))
    assert sorted(p.name for p in cfg_dir_entries(first.cache_dir.parent)) == [first.cache_dir.name]

    def boom(*a, **k):
        raise AssertionError("retokenised")

    monkeypatch.setattr(Tokenizer, "encode_documents", boom)
    second = prepare_data(cfg, log=lambda _: None)
    assert second.reused and second.cache_dir == first.cache_dir
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert first.tokenizer.decode(first.train[:50].tolist()).startswith("Document 0.")


def cfg_dir_entries(root: Path) -> list[Path]:
    kept = ("tokenizers", "sources", ".locks")
    return [p for p in root.iterdir() if p.is_dir() and p.name not in kept]


def test_cache_key_follows_vocab_and_text(tmp_path):
    d = _corpus(tmp_path)
    base = prepare_data(_cfg(tmp_path, d), log=lambda _: None).cache_dir
    other_vocab = prepare_data(_cfg(tmp_path, d, vocab_size=320), log=lambda _: None)
    (d / "doc03.txt").write_text("changed text " + TEXT)
    other_text = prepare_data(_cfg(tmp_path, d), log=lambda _: None)
    assert not other_vocab.reused and not other_text.reused
    assert len({base, other_vocab.cache_dir, other_text.cache_dir}) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_shard_is_reported(tmp_path, damage):
    cfg = _cfg(tmp_path, _corpus(tmp_path))
    shard = prepare_data(cfg, log=lambda _: None).cache_dir / "tokens-00000.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:-2])
    elif damage == "flip":
        data[10] ^= 0xFF
        shard.write_bytes(data)
    else:
        shard.unlink()
    with pytest.raises(DataError, match="tokens-00000.bin is corrupt or truncated.*delete"):
        prepare_data(cfg, log=lambda _: None)


def test_single_document_splits_by_tokens(tmp_path):
    (tmp_path / "one.txt").write_text(TEXT * 20)
    p = prepare_data(_cfg(tmp_path, tmp_path / "one.txt"), log=lambda _: None)
    assert p.manifest["split_by"] == "tokens" and len(p.val) > 0 and len(p.train) > len(p.val)


def test_split_caps_validation_share():
    docs = [np.arange(10)] * 9 + [np.arange(1000)]  # the last document is most of the corpus
    train, val, n_val = split_documents(docs, 0.05)
    assert n_val == 0 and 0 < len(val) <= 0.1 * 1090 and len(train) + len(val) == 1090
    train, val, n_val = split_documents([np.arange(10)] * 40, 0.05)
    assert n_val == 2 and len(val) == 20


def test_explicit_tokenizer_file_is_used(tmp_path, tok):
    path = tok.save(tmp_path / "tok")
    p = prepare_data(_cfg(tmp_path, _corpus(tmp_path), tokenizer=str(path)), log=lambda _: None)
    assert p.tokenizer.to_json() == tok.to_json()


# --- loader --------------------------------------------------------------------------------

TOKENS = np.arange(1000, dtype=np.uint16)  # window i starts at token i*L: easy to check


def test_windows_are_shifted_pairs():
    x, y = TokenLoader(TOKENS, 8, 4, seed=0).next_batch()
    assert x.dtype == torch.long and x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1]) and bool((x[:, 0] % 8 == 0).all())


def test_same_seed_same_batches_other_seed_differs():
    a, b, c = (TokenLoader(TOKENS, 8, 4, seed=s) for s in (1, 1, 2))
    xa, xb, xc = ([ld.next_batch()[0] for _ in range(5)] for ld in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_window_once_per_epoch_across_ranks(dp):
    loaders = [TokenLoader(TOKENS, 8, 8, seed=3, dp_rank=r, dp_size=dp) for r in range(dp)]
    n, steps = loaders[0].n_windows, loaders[0].steps_per_epoch
    assert (n, steps) == (124, 15)  # (1000 - 1) // 8 windows; 124 // 8 steps, 4 dropped
    seen = []
    for _ in range(steps):
        for ld in loaders:
            x, _ = ld.next_batch()
            assert x.shape == (8 // dp, 8)
            seen.extend((x[:, 0] // 8).tolist())
    assert len(seen) == len(set(seen)) == steps * 8
    assert all(ld.epoch == 1 and ld.step_in_epoch == 0 for ld in loaders)


def test_state_dict_resume_continues_identically():
    a = TokenLoader(TOKENS, 8, 4, seed=5)
    for _ in range(37):  # crosses an epoch boundary (31 steps per epoch)
        a.next_batch()
    sd = a.state_dict()
    assert all(type(v) is int for v in sd.values())
    b = TokenLoader(TOKENS, 8, 4, seed=0)
    b.load_state_dict(json.loads(json.dumps(sd)))
    for _ in range(40):
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))


def test_resume_with_other_dp_size_covers_the_rest_exactly():
    first = [TokenLoader(TOKENS, 8, 8, seed=7, dp_rank=r, dp_size=2) for r in range(2)]
    seen = []
    for _ in range(6):
        for ld in first:
            seen.extend(ld.sample_indices_for_step().tolist())
            ld.next_batch()
    sd = first[0].state_dict()
    assert sd == first[1].state_dict()
    resumed = [TokenLoader(TOKENS, 8, 8, seed=7, dp_rank=r, dp_size=4) for r in range(4)]
    for ld in resumed:
        ld.load_state_dict(sd)
    for _ in range(resumed[0].steps_per_epoch - 6):
        for ld in resumed:
            x, _ = ld.next_batch()
            seen.extend((x[:, 0] // 8).tolist())
    perm = np.random.default_rng((7, 0)).permutation(124)[: 15 * 8]
    assert seen == perm.tolist()


def test_loader_errors():
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        TokenLoader(TOKENS, 64, 64, seed=0)
    with pytest.raises(DataError, match="divisible"):
        TokenLoader(TOKENS, 8, 6, seed=0, dp_size=4)
    ld = TokenLoader(TOKENS, 8, 4, seed=0)
    with pytest.raises(DataError, match="seq_len 16"):
        ld.load_state_dict({**ld.state_dict(), "seq_len": 16})
    with pytest.raises(DataError, match="batch_size 8"):
        ld.load_state_dict({**ld.state_dict(), "batch_size": 8})


def test_val_batches_are_first_windows_in_order():
    batches = val_batches(TOKENS, 8, 4, n_batches=3)
    firsts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert firsts == [8 * i for i in range(12)]
    short = val_batches(np.arange(30), 8, 4, n_batches=3)  # only 3 windows
    assert len(short) == 1 and short[0][0].shape == (3, 8)
    with pytest.raises(DataError, match="validation data has 5 tokens"):
        val_batches(np.arange(5), 8, 4, 1)
