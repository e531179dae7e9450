"""`kiln generate` on a small saved model: the new tokens are the model's, a seed reproduces a
sample, --top-k 1 and a tiny --top-p are greedy, --num-samples prints that many samples."""

import pytest
import torch

from kiln.cli import main
from kiln.data.corpus import Document
from kiln.data.tokenizer import train_bpe
from kiln.interop.load import save_kiln
from kiln.models.gpt import GPT, GPTConfig
from kiln.train.load import LoadedModel

PROMPT = "the cat"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = train_bpe([Document("a", "the cat sat on the mat. the dog ran far away. " * 30)], 280)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64,
                    vocab_size=tok.vocab_size, max_seq_len=64)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper logits, so greedy and sampled text differ clearly
        model.tok_emb.weight.mul_(20)
    save_kiln(LoadedModel(model, tok, cfg, root, {}), root / "run", "test")
    return root / "run", model, tok


def _generate(path, capsys, *flags) -> str:
    assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "12", *flags]) == 0
    return capsys.readouterr().out


def test_greedy_text_is_the_models_argmax_continuation(saved, capsys):
    path, model, tok = saved
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():  # one full forward per new token, no cache
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = tok.decode(ids[0].tolist())
    assert len(want) > len(PROMPT) + 5
    assert _generate(path, capsys, "--temperature", "0") == want + "\n"
    for flags in (["--top-k", "1"], ["--top-p", "1e-9"]):  # both keep only the best token
        assert _generate(path, capsys, "--temperature", "1.5", *flags) == want + "\n", flags


def test_seed_reproduces_a_sample_and_num_samples_prints_each(saved, capsys):
    path = saved[0]
    one = _generate(path, capsys, "--temperature", "1.5", "--seed", "3")
    assert one == _generate(path, capsys, "--temperature", "1.5", "--seed", "3")
    assert one != _generate(path, capsys, "--temperature", "1.5", "--seed", "4")
    greedy = _generate(path, capsys, "--temperature", "0")
    assert one != greedy and one.startswith(PROMPT) and len(one) > len(PROMPT) + 2

    out = _generate(path, capsys, "--temperature", "1.5", "--num-samples", "3")
    parts = out.split("--- sample ")
    assert parts[0] == "" and [p.split("\n", 1)[0] for p in parts[1:]] == ["1", "2", "3"]
    samples = [p.split("\n", 1)[1].rstrip("\n") for p in parts[1:]]
    assert all(s.startswith(PROMPT) and len(s) > len(PROMPT) for s in samples)
    assert len(set(samples)) > 1  # each row samples on its own
