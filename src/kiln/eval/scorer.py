"""Log-likelihood scoring of (context, continuation) pairs with a Kiln GPT, as lm-eval defines it.

Tokenisation follows lm-eval's HF model: trailing spaces of the context move to the
continuation; ``ctx = encode(context)``, ``cont = encode(context + continuation)[len(ctx):]``;
an empty context is the prefix token (end-of-text). The model sees ``(ctx + cont)[-(L+1):-1]``
and the score is the sum of log p(cont_i | everything before it); ``is_greedy`` says whether
every continuation token is the argmax.

Requests that share the same context tokens (the choices of one question) compute the context
once: they are packed into one row (the context, then each continuation at the positions it
would have after the context, under a prefix-tree attention mask). Rows of many questions run
together in length-sorted (longest first, as lm-eval), right-padded batches of --batch-size
requests; logits are computed only at the scored positions. Requests too long for max_length
run as plain left-truncated rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.models.gpt import GPT

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
    @torch.inference_mode()
    def score_tokens(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        longest = max((len(cont) for _, cont in pairs), default=0)
        if longest > self.max_length:
            raise KilnError(
                f"a continuation of {longest} tokens is longer than the {self.max_length}-token "
                f"window the model can score; give a larger --max-length (up to the model's "
                f"max_seq_len {self.model.config.max_seq_len}) or shorter answer choices."
            )
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
            else:
                groups[tuple(ctx)].append(i)
        packed, singles = [], []
        for ctx, members in groups.items():
            longest = max(len(pairs[i][1]) for i in members)
            if len(ctx) + longest - 1 <= self.max_length:
                packed.append(members)
            else:  # needs left truncation: one plain row per request
                singles.extend(members)
        # Longest rows first (as lm-eval), so each batch pads little and memory peaks early.
        width = lambda m: len(pairs[m[0]][0]) + sum(len(pairs[i][1]) - 1 for i in m)
        packed.sort(key=lambda m: -width(m))
        batch: list[list[int]] = []
        for members in packed + [None]:  # type: ignore[list-item]
            full = members is None or sum(map(len, batch)) + len(members) > self.batch_size
            if batch and full:
                flat = [i for m in batch for i in m]
                for i, r in zip(flat, self._packed_batch([[pairs[i] for i in m] for m in batch])):
                    results[i] = r
                batch = []
            if members is not None:
                batch.append(members)
        singles.sort(key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(singles), self.batch_size):
            chunk = singles[start : start + self.batch_size]
            for i, r in zip(chunk, self._full_batch([pairs[i] for i in chunk])):
                results[i] = r
        return results  # type: ignore[return-value]

    def _pad(self, rows: list[list[int]], value: int = 0) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=self.device)

    def _hidden(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        """Final hidden states (before norm and head): GPT returns them when ``norm`` is None
        (the pipeline-stage contract), so logits are computed only where they are scored."""
        norm, self.model.norm = self.model.norm, None
        try:
            return self.model(tokens, **kw)
        finally:
            self.model.norm = norm

    def _gather(self, h: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
        """Hidden states [Σn, d] predicting the concatenated targets → (sum log p, all argmax)
        per target list; one head matmul and log-softmax for the whole batch."""
        logp = F.log_softmax(self.model.output(h).float(), dim=-1)
        t = torch.tensor([x for ts in targets for x in ts], device=h.device)
        lls = logp.gather(-1, t[:, None])[:, 0]
        hits = logp.argmax(-1) == t
        out, at = [], 0
        for ts in targets:
            n = len(ts)
            out.append((lls[at : at + n].sum().item(), bool(hits[at : at + n].all().item())))
            at += n
        return out

    def _full_batch(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        inputs, spans = [], []
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append(seq[:-1])
            spans.append((len(seq) - 1 - len(cont), cont))
        h = self._hidden(self._pad(inputs))
        rows = [h[b, s : s + len(c)] for b, (s, c) in enumerate(spans)]
        return self._gather(torch.cat(rows), [c for _, c in spans])

    def _packed_batch(self, groups: list[list[Pair]]) -> list[tuple[float, bool]]:
        """One row per group of requests sharing a context: the context once, then every
        continuation (minus its last token) at the positions it would have after the context,
        each seeing the context and its own earlier tokens only (a prefix-tree mask)."""
        tokens, positions, segments, picks, targets = [], [], [], [], []
        for b, group in enumerate(groups):
            ctx = group[0][0]
            row, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
            for s, (_, cont) in enumerate(group, 1):
                at = len(row)
                picks.extend([(b, len(ctx) - 1)] + [(b, at + k) for k in range(len(cont) - 1)])
                targets.append(cont)
                row += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
                seg += [s] * (len(cont) - 1)
            tokens.append(row)
            positions.append(pos)
            segments.append(seg)
        seg = self._pad(segments, -1)
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        mask = (same & causal)[:, None]
        h = self._hidden(self._pad(tokens), positions=self._pad(positions), attn_mask=mask)
        idx = torch.tensor(picks, device=self.device)
        return self._gather(h[idx[:, 0], idx[:, 1]], targets)


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
