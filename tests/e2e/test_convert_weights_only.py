"""kiln convert of a weights-only Hugging Face folder (``save_pretrained()`` without a tokenizer),
``--tokenizer`` in its three forms, what generate/eval say about a run without a tokenizer, and
the bos/eos ids an export writes for a tokenizer that has no end-of-text token of its own."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.cli import main
from kiln.interop.load import load_any
from tests.e2e.test_cli_errors import _snapshot

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog while 12 cats sleep in the sun. " * 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A byte-level BPE without <|endoftext|> (as tokenizer.json and as GPT-2 vocab/merges) and
    a GPT-2 model of exactly its vocabulary, saved by transformers without a tokenizer."""
    root = tmp_path_factory.mktemp("weights-only")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    hf.train_from_iterator([TEXT], trainer=trainer)
    (root / "tok").mkdir()
    hf.save(str(root / "tok" / "tokenizer.json"))
    (root / "gpt2-files").mkdir()
    hf.model.save(str(root / "gpt2-files"))  # vocab.json + merges.txt
    vocab = hf.get_vocab_size()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2, bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(root / "hf")
    return root, model, vocab


def _run(argv, capsys, code=0):
    got = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert got == code, out.err
    return out


def _same_logits(path, model, vocab):
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        assert (load_any(path, need_tokenizer=False).model(x) - ref).abs().max() < 1e-4


def test_weights_only_folder_converts_and_says_it_has_no_tokenizer(world, tmp_path, capsys):
    root, model, vocab = world
    assert not list((root / "hf").glob("*token*"))  # what save_pretrained alone writes
    out = _run(["convert", root / "hf", tmp_path / "run"], capsys)
    assert "no tokenizer" in out.out and "--tokenizer" in out.out
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    _same_logits(tmp_path / "run", model, vocab)
    (tmp_path / "task.jsonl").write_text('{"context": "the", "choices": [" fox"], "gold": 0}\n')
    (tmp_path / "task.yaml").write_text("name: t\ndata: task.jsonl\n")
    before = _snapshot(tmp_path)
    for argv in (["generate", tmp_path / "run", "--prompt", "the"],
                 ["eval", tmp_path / "run", "--tasks", tmp_path / "task.yaml"],
                 ["eval", root / "hf", "--tasks", tmp_path / "task.yaml"]):  # fmt: skip
        err = _run(argv, capsys, code=2).err.strip().splitlines()
        assert len(err) == 1 and "has no tokenizer" in err[0] and "--tokenizer PATH" in err[0]
    assert _snapshot(tmp_path) == before
    # the tokenizer-less run still exports (weights and config only)
    _run(["convert", tmp_path / "run", tmp_path / "hf-again"], capsys)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-again")
    _same_logits(tmp_path / "run", again, vocab)
    assert not (tmp_path / "hf-again" / "tokenizer.json").exists()


@pytest.mark.parametrize("form", ["folder", "tokenizer.json", "gpt2-files"])
def test_tokenizer_flag_attaches_one(world, tmp_path, capsys, form):
    root, model, vocab = world
    path = {"folder": root / "tok", "tokenizer.json": root / "tok" / "tokenizer.json",
            "gpt2-files": root / "gpt2-files"}[form]  # fmt: skip
    out = _run(["convert", root / "hf", tmp_path / "run", "--tokenizer", path], capsys)
    assert "no tokenizer" not in out.out
    _same_logits(tmp_path / "run", model, vocab)
    loaded = load_any(tmp_path / "run")
    assert (
        loaded.tokenizer.encode("the lazy dog")
        == HFTokenizer.from_file(str(root / "tok" / "tokenizer.json")).encode("the lazy dog").ids
    )
    out = _run(["generate", tmp_path / "run", "--prompt", "the lazy", "--max-new-tokens", "5"],
               capsys)  # fmt: skip
    assert out.out.startswith("the lazy")


def test_export_never_writes_a_token_id_outside_the_vocabulary(world, tmp_path, capfd):
    """The tokenizer has no <|endoftext|>; kiln's wrapper appends one at id = vocab size, which
    is no row of the embedding, so config.json / generation_config.json must not name it."""
    root, model, vocab = world
    _run(["convert", root / "hf", tmp_path / "run", "--tokenizer", root / "tok"], capfd)
    assert load_any(tmp_path / "run").tokenizer.eos_id == vocab  # the appended token
    _run(["convert", tmp_path / "run", tmp_path / "hf"], capfd)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    for d in (config, generation):
        for key in ("bos_token_id", "eos_token_id"):
            assert d.get(key) is None or 0 <= d[key] < config["vocab_size"], (key, d)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert "within the vocabulary" not in capfd.readouterr().err
    ids = fast("the lazy dog")["input_ids"]
    assert ids == load_any(tmp_path / "run").tokenizer.encode("the lazy dog")
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (again(x).logits - model(x).logits).abs().max() < 1e-4


def test_refused_tokenizer_changes_nothing(world, tmp_path, capsys):
    root, _, _ = world
    (tmp_path / "dst").mkdir()
    before = _snapshot(tmp_path)
    err = _run(["convert", root / "hf", tmp_path / "dst", "--tokenizer", tmp_path / "nope"],
               capsys, code=2).err  # fmt: skip
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before and not any((tmp_path / "dst").iterdir())
