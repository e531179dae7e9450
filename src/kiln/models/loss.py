"""The output head and the cross entropy fused, a chunk of tokens at a time.

``cross_entropy(F.linear(h, W), y)`` under bf16 autocast materialises the logits ``[N, V]`` in
bf16, again in fp32 for the log-softmax, the log-softmax itself (saved for backward) and its
gradient: four ``N × V`` tensors, ~1.4 GB for 2048 tokens of a 50257-word vocabulary, and as
many full passes over memory. :func:`linear_cross_entropy` computes the same loss with the
logits of ``chunk`` tokens at a time in two reused buffers (fp32 softmax statistics, as
above) and, when a gradient will be needed, writes ``d loss / d logits`` for the chunk at once
into one ``[N, V]`` buffer in the compute dtype; backward is then the two matmuls the unfused
graph does too (``dh = G W``, ``dW = Gᵀ h``). Same three matmuls, one ``N × V`` tensor kept
instead of four (measured on cerebras-gpt-111m shapes, 2048 tokens, on the 2-core CPU: head +
loss forward and backward take ~0.85 s instead of ~1.7 s, most of it the three matmuls).
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute ``t`` in: the autocast dtype when autocast is on for
    ``t``'s device, else ``t``'s own dtype."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: ~8M logits (32 MB in fp32), at least 16 rows."""
    return max(16, (1 << 23) // vocab)


class LinearCrossEntropyFn(torch.autograd.Function):
    """Mean over non-ignored tokens of ``-log softmax(m · h Wᵀ)[y]``; see the module docstring."""

    @staticmethod
    def forward(ctx, h, weight, targets, multiplier: float, ignore_index: int, chunk: int):
        dtype = compute_dtype(weight)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            n_tok, vocab = hc.shape[0], wc.shape[0]
            valid = targets != ignore_index
            count = valid.sum().clamp(min=1)
            safe = torch.where(valid, targets, 0)
            scale = valid.to(torch.float32) * (multiplier / count)  # d loss / d (m·logits) rows
            losses = torch.empty(n_tok, dtype=torch.float32, device=h.device)
            grad = torch.empty(n_tok, vocab, dtype=dtype, device=h.device) if need_grad else None
            rows = min(chunk, n_tok)
            logits = torch.empty(rows, vocab, dtype=dtype, device=h.device)
            probs = torch.empty(rows, vocab, dtype=torch.float32, device=h.device)
            for start in range(0, n_tok, rows):
                end = min(start + rows, n_tok)
                c = end - start
                lg, pr = logits[:c], probs[:c]
                torch.mm(hc[start:end], wc.t(), out=lg)
                tgt = safe[start:end, None]
                if multiplier != 1.0:
                    torch.mul(lg, multiplier, out=pr)
                else:
                    pr.copy_(lg)
                # one row-wise kernel (max, sum of exp, subtract) instead of four full passes
                torch._log_softmax(pr, 1, False, out=pr)
                losses[start:end] = pr.gather(1, tgt).squeeze(1).neg_() * valid[start:end]
                if grad is not None:  # (softmax − one-hot) × scale: the chunk's logit gradient
                    row_scale = scale[start:end, None]
                    pr.exp_().mul_(row_scale)
                    pr.scatter_add_(1, tgt, -row_scale)
                    grad[start:end].copy_(pr)
            loss = losses.sum() / count
        if grad is not None:
            ctx.save_for_backward(hc, wc, grad)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hc, wc, grad = ctx.saved_tensors
        unit = grad_loss.numel() == 1 and float(grad_loss) == 1.0  # the usual loss.backward()
        with torch.autocast(hc.device.type, enabled=False):
            dh = dw = None
            if ctx.needs_input_grad[0]:
                dh = torch.mm(grad, wc).to(ctx.dtypes[0])
                dh = dh if unit else dh.mul_(grad_loss)
            if ctx.needs_input_grad[1]:
                # (hᵀ G)ᵀ with hᵀ made contiguous first (a [d, tokens] copy, small): oneDNN
                # runs it ~1.8× faster than on the transposed view or than Gᵀ h (AMX Xeon,
                # 2048 tokens × 50257 × 768); the cast to the weight's dtype transposes it back
                # into a contiguous gradient in the same pass (and a unit upstream gradient
                # spares a pass over the vocab × d result).
                dw = torch.mm(hc.t().contiguous(), grad).t()
                dw = dw.to(ctx.dtypes[1], memory_format=torch.contiguous_format)
                dw = dw if unit else dw.mul_(grad_loss)
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    multiplier: float = 1.0,
    ignore_index: int = -100,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross entropy of ``multiplier · h @ weight.T`` against ``targets`` without
    materialising the fp32 logits. h ``[..., d]``, weight ``[V, d]``, targets ``[...]`` (int);
    ``ignore_index`` tokens count neither in the loss nor in the mean. Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32, as ``cross_entropy(logits)``."""
    h2 = h.reshape(-1, h.shape[-1])
    rows = chunk or chunk_rows(weight.shape[0])
    return LinearCrossEntropyFn.apply(
        h2, weight, targets.reshape(-1), float(multiplier), ignore_index, rows
    )


def head_loss(model, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """The loss component: a GPT's (or its last pipeline stage's) final-normed hidden states
    ``h`` [B, T, d] → mean next-token cross entropy through its head, fused and chunked
    (:func:`linear_cross_entropy`). Training calls it on ``model(x)`` with
    ``model.output_hidden`` set; ``model(x, targets=y)`` calls it too."""
    mult = model.config.output_multiplier
    return linear_cross_entropy(h, model.head_weight, targets, mult, ignore_index)


def logits_loss(model, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Unfused twin of :func:`head_loss` (logits, then an fp32 cross entropy): the graph
    torch.compile fuses by itself."""
    logits = model.logits(h).float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )
