"""Log-likelihood scoring of (context, continuation) pairs with a Kiln GPT, as lm-eval defines it.

Tokenisation follows lm-eval's HF model: trailing spaces of the context move to the
continuation; ``ctx = encode(context)``, ``cont = encode(context + continuation)[len(ctx):]``;
an empty context is the prefix token (end-of-text). The model sees ``(ctx + cont)[-(L+1):-1]``
and the score is the sum of log p(cont_i | everything before it); ``is_greedy`` says whether
every continuation token is the argmax.

Requests that share the same context tokens (the choices of one question) compute the context
once: a batch-1 prefill into a KV cache, copied to one row per choice, then all continuations
in one batch (right-padded: causal attention keeps padding from touching real positions).
Everything else runs in length-sorted, right-padded batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kiln.models.gpt import GPT, KVCache

Pair = tuple[list[int], list[int]]


class Scorer:
    def __init__(self, model: GPT, tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, max(1, batch_size)
        self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
        self.device = next(model.parameters()).device
        eos = tokenizer.eos_id
        self.prefix_id = eos if eos < model.config.vocab_size else 0

    # -- tokenisation ---------------------------------------------------------------------
    def encode_pairs(self, requests: Sequence[tuple[str, str]]) -> list[Pair]:
        ctxs, wholes = [], []
        for ctx, cont in requests:
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            ctxs.append(ctx)
            wholes.append(ctx + cont)
        ctx_ids = self.tok.encode_batch(ctxs)
        whole_ids = self.tok.encode_batch(wholes)
        pairs = []
        for ctx, c_ids, w_ids, (_, cont) in zip(ctxs, ctx_ids, whole_ids, requests):
            if not ctx:
                pairs.append(([self.prefix_id], self.tok.encode(cont)))
            else:
                pairs.append((c_ids, w_ids[len(c_ids) :]))
        return pairs

    # -- public API (lm-eval's three request types) -----------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score_tokens(self.encode_pairs(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(sum log-likelihood, number of tokens) of each whole text, in disjoint windows of
        max_length tokens, each conditioned on the token before it (lm-eval's rolling windows
        with context_len 1; the first window starts from the prefix token)."""
        pairs, owner = [], []
        for i, ids in enumerate(self.tok.encode_batch(list(texts))):
            for window in rolling_windows(ids, self.prefix_id, self.max_length):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.score_tokens(pairs)):
            totals[i] += ll
        return [(t, len(ids)) for t, ids in zip(totals, self.tok.encode_batch(list(texts)))]

    @torch.no_grad()
    def generate_until(self, context: str, until: Sequence[str], max_new_tokens: int = 256) -> str:
        """Greedy continuation of ``context``, cut at the first stop string."""
        from kiln.models.generate import generate

        ids = self.tok.encode(context) or [self.prefix_id]
        ids = ids[-(self.max_length - 1) :]
        budget = min(max_new_tokens, self.max_length - len(ids))
        prompt = torch.tensor([ids], device=self.device)
        out = generate(self.model, prompt, budget, temperature=0.0, eos_id=self.tok.eos_id)
        text = self.tok.decode(out[0, len(ids) :].tolist())
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text

    # -- scoring ------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        singles = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
            else:
                groups[tuple(ctx)].append(i)
        for ctx, members in groups.items():
            longest = max(len(pairs[i][1]) for i in members)
            if len(members) > 1 and len(ctx) + longest <= self.max_length:
                for i, r in zip(
                    members, self._shared_prefix(list(ctx), [pairs[i][1] for i in members])
                ):
                    results[i] = r
            else:
                singles.extend(members)
        singles.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start : start + self.batch_size]
            for i, r in zip(chunk, self._full_batch([pairs[i] for i in chunk])):
                results[i] = r
        return results  # type: ignore[return-value]

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.device)

    def _hidden(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Final hidden states (before norm and head): GPT returns them when ``norm`` is None
        (the pipeline-stage contract), so logits are computed only where they are scored."""
        norm, self.model.norm = self.model.norm, None
        try:
            return self.model(tokens, **kw)
        finally:
            self.model.norm = norm

    @staticmethod
    def _gather(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
        """logits [n, V] predicting targets [n] → (sum log p, all argmax)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        t = torch.tensor(targets, device=logits.device)
        ll = logp.gather(-1, t[:, None]).sum().item()
        return ll, bool((logp.argmax(-1) == t).all().item())

    @torch.no_grad()
    def _full_batch(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        inputs, spans = [], []
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append(seq[:-1])
            spans.append((len(seq) - 1 - len(cont), cont))
        h = self._hidden(self._pad(inputs))
        out = []
        for b, (s, c) in enumerate(spans):
            out.append(self._gather(self.model.output(h[b, s : s + len(c)]), c))
        return out

    @torch.no_grad()
    def _shared_prefix(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        n, L = len(conts), len(ctx)
        longest = max(len(c) for c in conts)
        cache = KVCache.for_model(self.model, 1, L + longest)
        h = self._hidden(torch.tensor([ctx], device=self.device), kv_cache=cache)
        last = self.model.output(h[0, -1])
        rest = None
        if longest > 1:
            big = KVCache.for_model(self.model, n, L + longest)
            for src, dst in zip(cache.layers, big.layers):
                dst.k[:, :, :L] = src.k[:, :, :L]
                dst.v[:, :, :L] = src.v[:, :, :L]
            h = self._hidden(self._pad([c[:-1] or [0] for c in conts]), kv_cache=big, start_pos=L)
            rest = self.model.output(h)
        out = []
        for b, cont in enumerate(conts):
            logits = (
                last[None] if rest is None else torch.cat([last[None], rest[b, : len(cont) - 1]])
            )
            out.append(self._gather(logits[: len(cont)], cont))
        return out


def rolling_windows(ids: list[int], prefix_id: int, max_len: int) -> list[Pair]:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, as
    (context, continuation) token pairs: each window predicts up to max_len new tokens; the
    last, shorter window keeps as much preceding context as fits (as make_disjoint_window)."""
    if not ids:
        return []
    first = min(max_len, len(ids))
    windows = [([prefix_id], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_len)
        windows.append((ids[done + n - max_len - 1 : done], ids[done : done + n]))
        done += n
    return windows
