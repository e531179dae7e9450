"""The AMX tile kernels equal masked-dense in bf16 on shapes that are not multiples of a tile
(tokens % 16 != 0, token pairs % 16 != 0, blocks 32 / 64 / 128, more than one 256-pair K chunk
of the weight gradient); a refused tile permission falls back to the AVX512-BF16 kernels; the
chooser times the AMX kernel as its own candidate. The numeric tests skip, saying why, on CPUs
without AMX."""

import logging

import pytest
import torch
import torch.nn.functional as F
from tests.unit.test_sparse_kernels import NEEDS_AMX, rel_err

from kiln.errors import ConfigError
from kiln.sparsity import choose, kernels
from kiln.sparsity.cpp_kernels import CppKernels
from kiln.sparsity.kernels import BlockLayout, block_sparse_linear, block_sparse_mlp, masked_linear
from kiln.sparsity.patterns import block_mask

LINEAR = [  # out, in, block, density, axis, tokens
    (128, 256, 64, 0.25, "rows", 50),  # 32 + 16 tile rows + 2 AVX rows; 16 + 9 token pairs
    (256, 256, 128, 0.5, "rows", 83),  # two token tiles (64 + 19); odd token count
    (96, 64, 32, 1 / 3, "cols", 37),
    (64, 96, 32, 1 / 3, "rows", 130),
    (64, 64, 32, 0.5, "rows", 601),  # weight gradient: 301 pairs = 256 + 32 on tiles + 13
    (64, 192, 64, 1 / 3, "rows", 7),  # fewer tokens than a tile: all AVX512
]


@NEEDS_AMX
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,b,density,axis,tokens", LINEAR)
def test_amx_linear_matches_masked(wdtype, out_f, in_f, b, density, axis, tokens):
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(torch.rand(out_f, in_f, generator=gen), density, b, axis=axis)
    w = (torch.randn(out_f, in_f, generator=gen) * mask).to(wdtype).requires_grad_()
    bias = torch.randn(out_f, generator=gen).to(wdtype).requires_grad_()
    x = torch.randn(tokens, in_f, generator=gen).bfloat16().requires_grad_()
    g = torch.randn(tokens, out_f, generator=gen).bfloat16()
    ref = masked_linear(x.float(), w.float(), bias.float(), mask)
    ref.backward(g.float())
    expected = [ref, x.grad, w.grad, bias.grad]
    x.grad = w.grad = bias.grad = None
    y = block_sparse_linear(x, w, bias, BlockLayout.from_mask(mask, b), "amx")
    y.backward(g)
    for got, want in zip([y, x.grad, w.grad, bias.grad], expected):
        assert rel_err(got, want) < 2e-2
    assert (w.grad[~mask] == 0).all()


@NEEDS_AMX
@pytest.mark.parametrize(
    "d,f,b1,b2,tokens", [(64, 128, 32, 64, 50), (128, 256, 64, 128, 83), (128, 256, 128, 32, 21)]
)
def test_amx_mlp_matches_masked(d, f, b1, b2, tokens):
    """Fused fc1 -> exact GELU -> fc2 on tiles == masked fp32, output and all five gradients."""
    gen = torch.Generator().manual_seed(1)
    m1 = block_mask(torch.rand(f, d, generator=gen), 0.5, b1, axis="cols")
    m2 = block_mask(torch.rand(d, f, generator=gen), 0.5, b2, axis="rows")
    w1 = (torch.randn(f, d, generator=gen) * m1).bfloat16().requires_grad_()
    w2 = (torch.randn(d, f, generator=gen) * m2 / 4).bfloat16().requires_grad_()
    c1, c2 = (torch.randn(n, generator=gen).bfloat16().requires_grad_() for n in (f, d))
    x = torch.randn(tokens, d, generator=gen).bfloat16().requires_grad_()
    g = torch.randn(tokens, d, generator=gen).bfloat16()
    params = [x, w1, w2, c1, c2]
    h = masked_linear(x.float(), w1.float(), c1.float(), m1)
    ref = masked_linear(F.gelu(h), w2.float(), c2.float(), m2)
    ref.backward(g.float())
    expected = [ref] + [p.grad for p in params]
    for p in params:
        p.grad = None
    lay1, lay2 = BlockLayout.from_mask(m1, b1), BlockLayout.from_mask(m2, b2)
    y = block_sparse_mlp(x, w1, c1, w2, c2, lay1, lay2, "amx")
    y.backward(g)
    for got, want in zip([y] + [p.grad for p in params], expected):
        assert rel_err(got, want) < 3e-2
    assert (w1.grad[~m1] == 0).all() and (w2.grad[~m2] == 0).all()


def test_refused_tile_permission_falls_back_to_avx512(monkeypatch, caplog):
    """Linux may refuse AMX tile data (arch_prctl): the AMX kernels are then unavailable, said
    once in the log, and 'auto' runs the AVX512-BF16 kernels (or torch) with the same result."""
    if not (kernels._cpu_has_amx() and kernels._cpu_has_avx512_bf16()):
        pytest.skip("the AMX build is only attempted on CPUs with amx_tile, amx_bf16, avx512_bf16")
    monkeypatch.delenv("KILN_SPARSE_AMX", raising=False)  # the build is attempted even if off
    monkeypatch.delenv("KILN_SPARSE_CPP", raising=False)
    monkeypatch.setattr(kernels, "_AMX", None)
    monkeypatch.setattr(kernels, "_AMX_TRIED", False)
    monkeypatch.setattr(CppKernels, "amx_init", lambda self: "Linux refused AMX tiles")
    with caplog.at_level(logging.WARNING, logger="kiln.sparsity.kernels"):
        assert kernels.amx_extension() is None
    assert "AMX block-sparse kernels unavailable (Linux refused AMX tiles)" in caplog.text
    assert kernels._resolve_backend("auto") == ("cpp" if kernels.cpp_extension() else "torch")
    mask = block_mask(torch.rand(64, 64), 0.5, 32)
    lay = BlockLayout.from_mask(mask, 32)
    x, w = torch.randn(40, 64, dtype=torch.bfloat16), torch.randn(64, 64) * mask
    y = block_sparse_linear(x, w, None, lay)
    assert rel_err(y, masked_linear(x.float(), w, None, mask)) < 2e-2
    with pytest.raises(ConfigError, match="'amx' is unavailable"):
        block_sparse_linear(x, w, None, lay, "amx")


def test_chooser_times_amx_as_its_own_candidate(monkeypatch):
    """Where the AMX kernels load, the chooser times them under their own name next to the
    AVX512-BF16 one, and pick_kernel maps the AMX winner to the block-amx kernel."""
    from kiln.sparsity.apply import pick_kernel

    monkeypatch.setattr(kernels, "_AMX", object())  # never called: timings are injected
    monkeypatch.setattr(kernels, "_AMX_TRIED", True)
    monkeypatch.setattr(kernels, "_EXT", object())
    monkeypatch.setattr(kernels, "_EXT_TRIED", True)
    times = {"dense": 6e-3, "masked-dense": 7e-3, "block32-amx": 1e-3, "block32-cpp": 4e-3}
    times["block32-torch"] = 9e-3
    seen = []
    monkeypatch.setattr(
        choose, "_time_candidate", lambda name, *a: seen.append(name) or times[name]
    )
    monkeypatch.setattr(choose, "_CHOICES", {})
    kernel, _, reason = pick_kernel("auto", "block", 32, (64, 128), 0.5, 32, "bf16", "cpu")
    assert sorted(set(seen)) == sorted(times) and kernel == "block-amx"
    assert reason.startswith("block32-amx 1.0 ms < block32-cpp 4.0 ms < dense 6.0 ms")
