"""The lm-eval model adapter gives the same numbers as Kiln's own scorer (needs lm-eval)."""

import pytest
import torch

from kiln.data.corpus import Document
from kiln.data.tokenizer import train_bpe
from kiln.interop.load import save_kiln
from kiln.models.gpt import GPT, GPTConfig
from kiln.train.load import LoadedModel

pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (it is in the dev extra: pip install -e '.[dev]')"
)


def test_adapter_matches_scorer(tmp_path):
    from lm_eval.api.instance import Instance

    from kiln.eval.lm_eval_adapter import KilnLM
    from kiln.eval.scorer import Scorer

    tok = train_bpe([Document("a", "the cat sat on the mat. the dog ran. " * 30)], 280)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64,
                    vocab_size=tok.vocab_size, max_seq_len=32)  # fmt: skip
    model = GPT(cfg).eval()
    save_kiln(LoadedModel(model, tok, cfg, tmp_path, {}), tmp_path / "run", "test")
    lm = KilnLM(pretrained=str(tmp_path / "run"), batch_size=2)
    reqs = [("the cat", " sat on"), ("the dog", " ran.")]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    ref = Scorer(model, tok).loglikelihood(reqs)
    got = lm.loglikelihood(inst)
    assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=1e-5)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the cat",), 0)])
    assert rolling[0] == pytest.approx(Scorer(model, tok).loglikelihood_rolling(["the cat"])[0][0])
    gen = lm.generate_until(
        [Instance("generate_until", {}, ("the", {"until": ["\n"], "max_gen_toks": 5}), 0)]
    )
    assert isinstance(gen[0], str) and "\n" not in gen[0]
