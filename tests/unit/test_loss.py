"""The fused head + cross entropy equals the unfused one (loss and every gradient), the malloc
tuning applies once and can be turned off, and the optimizer is torch's fused AdamW."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kiln.config import TrainConfig
from kiln.models.gpt import GPT, GPTConfig, cross_entropy
from kiln.models.loss import chunk_rows, linear_cross_entropy
from kiln.train.optim import build_optimizer

SHAPE = GPTConfig(
    n_layers=2, d_model=64, n_heads=2, n_kv_heads=2, d_head=32, d_ffn=128, vocab_size=211,
    max_seq_len=32, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip


def grads_of(loss_fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("multiplier", [1.0, 0.37])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_matches_unfused_fp32(multiplier, chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (3, 20), generator=gen)
    y[0, :4] = -100  # ignored positions count neither in the loss nor in the mean

    def unfused():
        return cross_entropy(F.linear(h, w) * multiplier, y)

    def fused():
        return linear_cross_entropy(h, w, y, multiplier, chunk=chunk)

    want, (dh, dw) = grads_of(unfused, h, w)
    got, (gh, gw) = grads_of(fused, h, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, dh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, dw, rtol=1e-5, atol=1e-7)
    assert not gh[0, :4].any()  # ignored tokens get no gradient


def test_upstream_gradient_scales_both_grads():
    """Gradient accumulation divides the loss: the fused backward must scale by grad_output."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(30, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 30, (10,), generator=gen)
    _, (dh, dw) = grads_of(lambda: linear_cross_entropy(h, w, y), h, w)
    _, (qh, qw) = grads_of(lambda: linear_cross_entropy(h, w, y) / 4, h, w)
    torch.testing.assert_close(qh * 4, dh)
    torch.testing.assert_close(qw * 4, dw)
    assert w.grad.is_contiguous()  # the transposed matmul is cast back contiguous


def test_model_targets_path_matches_logits_path_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(SHAPE)
    x = torch.randint(0, SHAPE.vocab_size, (2, 32))
    y = torch.randint(0, SHAPE.vocab_size, (2, 32))
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, g_want = grads_of(lambda: cross_entropy(model(x), y), *params)
        got, g_got = grads_of(lambda: model(x, targets=y), *params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want):
        if name.endswith("wk.bias"):  # exactly zero in theory: only rounding noise
            continue
        scale = b.abs().max()
        assert (a - b).abs().max() <= 2e-2 * scale, name  # bf16 rounding of the same math


def test_no_grad_path_keeps_no_gradient_buffer():
    torch.manual_seed(0)
    model = GPT(SHAPE)
    x = torch.randint(0, SHAPE.vocab_size, (2, 32))
    with torch.no_grad():
        loss = model(x, targets=x)
        want = cross_entropy(model(x), x)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, want)


def test_targets_need_a_head():
    model = GPT(SHAPE)
    model.norm = None
    with pytest.raises(ValueError, match="targets need"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))


def test_chunk_rows_bounds_the_buffers():
    assert chunk_rows(50257) * 50257 * 4 <= 32 * 2**20
    assert chunk_rows(10**9) == 16


def test_optimizer_is_fused_adamw_for_plain_parameters():
    opt = build_optimizer(GPT(SHAPE), TrainConfig())
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
@pytest.mark.parametrize(
    "setting, expected",
    [("1", "True True False"), ("0", "False False False"), ("memory", "False False True")],
)
def test_malloc_tuning_applies_once_and_can_be_turned_off(setting, expected):
    code = (
        "from kiln.train.malloc import keep_freed_memory as k, returns_freed_memory as r\n"
        "print(k(), k(), r())"
    )
    env = {**os.environ, "KILN_MALLOC_TUNING": setting}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == expected


FREED = """
import torch
from kiln.train.malloc import keep_freed_memory
keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(16 * 2**20 // 4)  # 16 MiB, pages touched
for _ in range(4):  # freed, then a different size: a kept heap fragments
    x, y = None, torch.ones(24 * 2**20 // 4)
    y, x = None, torch.ones(16 * 2**20 // 4)
held = rss()
x = None
print((held - rss()) // 2**20)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
@pytest.mark.parametrize("setting, returned", [("1", False), ("memory", True)])
def test_malloc_memory_setting_returns_freed_blocks_to_the_kernel(setting, returned):
    env = {**os.environ, "KILN_MALLOC_TUNING": setting}
    out = subprocess.run(
        [sys.executable, "-c", FREED], capture_output=True, text=True, env=env, check=True
    )
    freed_mib = int(out.stdout.strip())
    assert (freed_mib >= 15) is returned, freed_mib
