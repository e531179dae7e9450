"""Autoregressive sampling with a KV cache: one prefill, then one token per forward."""

from __future__ import annotations

import torch

from kiln.models.gpt import GPT, KVCache


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (smallest set with mass >= top_p) to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompt_tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt_tokens`` [T] or [B, T]; return prompt + new tokens [B, T + n].

    temperature 0 is greedy. Generation stops at max_new_tokens, at max_seq_len, or when every
    row has produced ``eos_id`` (finished rows are then padded with eos_id). A prompt too long
    to leave room for max_new_tokens is cropped to its last max_seq_len - max_new_tokens tokens
    for the model's input (at least one token is kept); the returned prompt is not cropped.
    """
    prompt = prompt_tokens if prompt_tokens.dim() == 2 else prompt_tokens[None]
    limit = model.config.max_seq_len
    context = prompt[:, -max(1, limit - max_new_tokens) :]
    steps = min(max_new_tokens, limit - context.shape[1])
    if steps <= 0:
        return prompt
    cache = KVCache.for_model(model, prompt.shape[0], max_len=context.shape[1] + steps)
    logits = model(context, kv_cache=cache, start_pos=0)[:, -1]
    pos = context.shape[1]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    new = []
    for i in range(steps):
        token = _sample(logits.float(), temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        new.append(token)
        if i == steps - 1 or (eos_id is not None and bool(finished.all())):
            break
        logits = model(token[:, None], kv_cache=cache, start_pos=pos)[:, -1]
        pos += 1
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
