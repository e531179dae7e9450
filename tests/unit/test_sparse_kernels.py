"""Sparse kernels match dense-times-mask for outputs and all gradients (bf16 tolerance)."""

import os

import pytest
import torch

from kiln.errors import ConfigError
from kiln.sparsity import choose, kernels
from kiln.sparsity.choose import choose_kernel
from kiln.sparsity.kernels import (
    BlockLayout,
    BlockSparseLinear,
    block_sparse_linear,
    block_sparse_mlp,
    masked_linear,
)
from kiln.sparsity.patterns import block_mask


def _cpp_skip_reason() -> str:
    if os.environ.get("KILN_SPARSE_CPP", "1") == "0":
        return "the C++ block-sparse kernels are off (KILN_SPARSE_CPP=0)"
    if not kernels._cpu_has_avx512_bf16():
        return "the C++ block-sparse kernels need a CPU with avx512_bf16; this one has none"
    return "the C++ block-sparse kernels failed to build here (see the warning logged above)"


def _amx_skip_reason() -> str:
    if os.environ.get("KILN_SPARSE_AMX", "1") == "0" or os.environ.get("KILN_SPARSE_CPP") == "0":
        return "the AMX block-sparse kernels are off (KILN_SPARSE_AMX=0 or KILN_SPARSE_CPP=0)"
    if not (kernels._cpu_has_amx() and kernels._cpu_has_avx512_bf16()):
        return "the AMX block-sparse kernels need a CPU with amx_tile, amx_bf16, avx512_bf16"
    return "the AMX kernels failed to build or Linux refused AMX tiles (see the warning logged)"


NEEDS_AMX = pytest.mark.skipif(kernels.amx_extension() is None, reason=_amx_skip_reason())
# the C++ cases stay in the list and say why they are skipped where the kernels are missing
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(kernels.cpp_extension() is None,
                                                  reason=_cpp_skip_reason())),
    pytest.param("amx", marks=NEEDS_AMX),
]  # fmt: skip


def _no_cpp(monkeypatch) -> None:
    """As on a CPU without the C++ kernels: neither the AVX512-BF16 nor the AMX build."""
    for name, value in (("_EXT", None), ("_EXT_TRIED", True), ("_AMX", None), ("_AMX_TRIED", True)):
        monkeypatch.setattr(kernels, name, value)


CASES = [  # out, in, block, density, axis, input shape prefix
    (64, 96, 32, 1 / 3, "rows", (5,)),
    (96, 64, 32, 0.5, "rows", (2, 7)),
    (96, 64, 32, 1 / 3, "cols", (2, 7)),
    (128, 64, 32, 0.5, "rows", (3, 13)),
    (128, 256, 64, 0.25, "rows", (2, 9)),
    (256, 128, 128, 0.5, "cols", (33,)),
    (64, 64, 32, 1.0, "rows", (4,)),
]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,b,density,axis,lead", CASES)
def test_block_sparse_matches_masked(backend, wdtype, out_f, in_f, b, density, axis, lead):
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(torch.rand(out_f, in_f, generator=gen), density, b, axis=axis)
    layout = BlockLayout.from_mask(mask, b)
    w = (torch.randn(out_f, in_f, generator=gen) * mask).to(wdtype).requires_grad_()
    bias = torch.randn(out_f, generator=gen).to(wdtype).requires_grad_()
    x = torch.randn(*lead, in_f, generator=gen).to(torch.bfloat16).requires_grad_()
    g = torch.randn(*lead, out_f, generator=gen).to(torch.bfloat16)

    ref = masked_linear(x.float(), w.float(), bias.float(), mask)
    ref.backward(g.float())
    expected = [ref, x.grad, w.grad, bias.grad]
    x.grad = w.grad = bias.grad = None

    y = block_sparse_linear(x, w, bias, layout, backend)
    y.backward(g)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert w.grad.dtype == wdtype and x.grad.shape == x.shape
    for got, want in zip([y, x.grad, w.grad, bias.grad], expected):
        assert rel_err(got, want) < 2e-2
    assert (w.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "with_bias,wdtype", [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float32)]
)
@pytest.mark.parametrize(
    "d,f,b1,b2,density,lead", [(64, 128, 32, 32, 0.5, (3, 11)), (128, 256, 64, 32, 0.25, (37,))]
)
def test_block_sparse_mlp_matches_masked(backend, with_bias, wdtype, d, f, b1, b2, density, lead):
    """Fused GELU MLP == masked fc2(gelu(fc1 x)) in fp32, outputs and all five gradients."""
    gen = torch.Generator().manual_seed(1)
    m1 = block_mask(torch.rand(f, d, generator=gen), density, b1, axis="cols")
    m2 = block_mask(torch.rand(d, f, generator=gen), density, b2, axis="rows")
    w1 = (torch.randn(f, d, generator=gen) * m1).to(wdtype).requires_grad_()
    w2 = (torch.randn(d, f, generator=gen) * m2 / 4).to(wdtype).requires_grad_()
    bias = [torch.randn(n, generator=gen).to(wdtype).requires_grad_() for n in (f, d)]
    c1, c2 = bias if with_bias else (None, None)
    x = torch.randn(*lead, d, generator=gen).bfloat16().requires_grad_()
    g = torch.randn(*lead, d, generator=gen).bfloat16()
    params = [x, w1, w2] + ([c1, c2] if with_bias else [])

    def fp32(t):
        return None if t is None else t.float()

    h = masked_linear(x.float(), w1.float(), fp32(c1), m1)
    ref = masked_linear(torch.nn.functional.gelu(h), w2.float(), fp32(c2), m2)
    ref.backward(g.float())
    expected = [ref] + [p.grad for p in params]
    for p in params:
        p.grad = None
    lay1, lay2 = BlockLayout.from_mask(m1, b1), BlockLayout.from_mask(m2, b2)
    y = block_sparse_mlp(x, w1, c1, w2, c2, lay1, lay2, backend)
    y.backward(g)
    assert y.dtype == x.dtype and all(p.grad.dtype == p.dtype for p in params)
    for got, want in zip([y] + [p.grad for p in params], expected):
        assert rel_err(got, want) < 3e-2
    assert (w1.grad[~m1] == 0).all() and (w2.grad[~m2] == 0).all()


def test_module_keeps_dense_masked_weight_and_reloads_layout():
    mask = block_mask(torch.rand(64, 96), 1 / 3, 32)
    layer = BlockSparseLinear(96, 64, mask, block_size=32)
    assert (layer.weight[~mask] == 0).all()
    y = layer(torch.randn(2, 3, 96, dtype=torch.bfloat16))
    assert y.shape == (2, 3, 64)
    other = BlockSparseLinear(96, 64, block_mask(torch.rand(64, 96), 1 / 3, 32), block_size=32)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.layout.kept, layer.layout.kept)


def test_layout_rejects_non_block_mask():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ConfigError):
        BlockLayout.from_mask(mask, 32)


def test_choose_kernel_block_returns_valid_kernel():
    name, fn = choose_kernel(64, 128, 32, "block", 0.5, reps=1)
    reason = choose.kernel_choice_reason(64, 128, 32, "block", 0.5, torch.bfloat16, "cpu")
    timed = [part.rsplit(" ", 2)[0] for part in reason.split(" < ")]
    assert timed[0] == name  # the reason starts with the winner, then every other candidate
    assert {"dense", "masked-dense", "block32-torch", "block64-torch"} <= set(timed)
    assert len(timed) == len(set(timed))  # no candidate named twice
    b = int(name[5:].split("-")[0]) if name.startswith("block") else 32
    mask = choose._try_block_mask(torch.rand(64, 128), 0.5, b)  # an axis that fits this b
    w = torch.randn(64, 128, dtype=torch.bfloat16) * mask
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = fn(x, w, None, mask)
    assert rel_err(y, masked_linear(x.float(), w.float(), None, mask)) < 2e-2


def _inject(monkeypatch, times: dict[str, float]) -> list[str]:
    """Replace the timer by fixed times per candidate; returns the candidates timed."""
    seen: list[str] = []

    def fake(name, fn, x, weight, bias, mask, reps):
        seen.append(name)
        return times[name]

    monkeypatch.setattr(choose, "_time_candidate", fake)
    monkeypatch.setattr(choose, "_CHOICES", {})
    return seen


@pytest.mark.parametrize(
    ("times", "winner"),
    [
        ({"dense": 6.0, "masked-dense": 6.3, "block32-torch": 9.0}, "dense"),
        ({"dense": 6.0, "masked-dense": 5.0, "block32-torch": 9.0}, "masked-dense"),
        ({"dense": 6.0, "masked-dense": 6.3, "block32-torch": 2.0}, "block32-torch"),
        ({"dense": 6.0, "masked-dense": 6.0, "block32-torch": 6.0}, "dense"),  # ties: dense
    ],
)
def test_chooser_picks_fastest_and_logs_every_candidate(monkeypatch, caplog, times, winner):
    _no_cpp(monkeypatch)
    times = {k: v / 1e3 for k, v in times.items()}
    seen = _inject(monkeypatch, times)
    with caplog.at_level("INFO", logger="kiln.sparsity.choose"):
        name, fn = choose_kernel(64, 128, 32, "block32", 0.5)
    assert sorted(set(seen)) == sorted(times) and name == winner
    assert seen == seen[: len(times)] * 5  # 5 rounds, each over every candidate (interleaved)
    reason = choose.kernel_choice_reason(64, 128, 32, "block32", 0.5, torch.bfloat16, "cpu")
    expected = " < ".join(
        f"{n} {times[n] * 1e3:.1f} ms" for n in sorted(times, key=lambda n: times[n])
    )
    assert reason == expected and expected in caplog.text
    if winner == "dense":
        assert fn is kernels.dense_linear


def test_pick_kernel_maps_a_dense_choice_to_the_dense_kernel(monkeypatch):
    from kiln.sparsity.apply import pick_kernel

    _no_cpp(monkeypatch)
    _inject(monkeypatch, {"dense": 1e-3, "masked-dense": 2e-3, "block32-torch": 3e-3})
    kernel, fn, reason = pick_kernel("auto", "block", 32, (64, 128), 0.5, 32, "bf16", "cpu")
    assert (kernel, fn) == ("dense", None) and reason.startswith("dense 1.0 ms <")
    # fp32: the C++ kernels compute in bf16, so dense, masked-dense and the fp32 torch kernel
    monkeypatch.setattr(kernels, "_EXT", object())  # even where the C++ kernels exist
    seen = _inject(monkeypatch, {"dense": 2e-3, "masked-dense": 1e-3, "block32-torch": 3e-3})
    kernel, _, reason = pick_kernel("auto", "block", 32, (64, 128), 0.5, 32, "fp32", "cpu")
    assert kernel == "masked" and sorted(set(seen)) == ["block32-torch", "dense", "masked-dense"]
    assert reason == "masked-dense 1.0 ms < dense 2.0 ms < block32-torch 3.0 ms"
    seen = _inject(monkeypatch, {"dense": 2e-3, "masked-dense": 1e-3})
    kernel, _, reason = pick_kernel("auto", "2:4", 32, (64, 128), 0.5, 32, "fp32", "cpu")
    assert kernel == "masked" and reason.startswith("no sparse kernel for pattern '2:4' in fp32")


def test_torch_block_kernel_computes_in_fp32_for_fp32_inputs():
    """An fp32 run's block kernel stays fp32 (equal to masked-dense to float rounding), so
    CPUs without bf16 matmul hardware can gain from sparsity too."""
    torch.manual_seed(0)
    mask = block_mask(torch.rand(64, 96), 1 / 3, 32)
    lay = BlockLayout.from_mask(mask, 32)
    w = (torch.randn(64, 96) * mask).requires_grad_()
    b = torch.randn(64, requires_grad=True)
    x = torch.randn(5, 96, requires_grad=True)
    y = block_sparse_linear(x, w, b, lay, "torch")
    assert y.dtype == torch.float32
    g = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    want = masked_linear(x, w, b, mask)
    ex, ew, eb = torch.autograd.grad(want, (x, w, b), g)
    for got, ref in ((y, want), (dx, ex), (dw, ew), (db, eb)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: bf16 like F.linear
        assert block_sparse_linear(x, w, b, lay, "torch").dtype == torch.bfloat16


def test_rank_candidates_needs_a_candidate():
    with pytest.raises(ValueError):
        choose.rank_candidates({})


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_choose_kernel_without_sparse_kernel_times_dense_and_masked(pattern):
    name, fn = choose_kernel(64, 128, 32, pattern, 0.5, reps=1)
    assert name in ("dense", "masked-dense")
    assert fn is (kernels.dense_linear if name == "dense" else masked_linear)
    assert not kernels.semi_structured_available("cpu")


def test_cpp_backend_falls_back(monkeypatch):
    _no_cpp(monkeypatch)
    mask = block_mask(torch.rand(64, 64), 0.5, 32)
    layout = BlockLayout.from_mask(mask, 32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = block_sparse_linear(x, torch.randn(64, 64) * mask, None, layout)  # auto -> torch
    assert y.shape == (3, 64)
    with pytest.raises(ConfigError):
        block_sparse_linear(x, torch.randn(64, 64) * mask, None, layout, "cpp")


def test_failed_build_falls_back_to_torch(monkeypatch, tmp_path):
    """No working compiler: neither C++ build loads and 'auto' runs the torch kernels."""
    for name, value in (
        ("_EXT", None),
        ("_EXT_TRIED", False),
        ("_AMX", None),
        ("_AMX_TRIED", False),
    ):
        monkeypatch.setattr(kernels, name, value)
    monkeypatch.setattr(kernels, "_cpu_has_amx", lambda: True)
    monkeypatch.setattr(kernels, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("KILN_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.cpp_extension() is None and kernels.amx_extension() is None
    mask = block_mask(torch.rand(64, 64), 0.5, 32)
    lay = BlockLayout.from_mask(mask, 32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, 64) * mask
    y = block_sparse_mlp(x, w, None, w, None, lay, lay)
    ref = masked_linear(
        torch.nn.functional.gelu(masked_linear(x.float(), w, None, mask)), w, None, mask
    )
    assert rel_err(y, ref) < 3e-2


def test_shape_mismatch_is_refused():
    mask = block_mask(torch.rand(64, 32), 0.5, 32, axis="cols")
    lay = BlockLayout.from_mask(mask, 32)
    w = torch.randn(64, 32) * mask
    with pytest.raises(ConfigError):
        block_sparse_linear(torch.randn(3, 64, dtype=torch.bfloat16), w, None, lay)
    with pytest.raises(ConfigError):  # fc2 must take fc1's 64 outputs
        block_sparse_mlp(torch.randn(3, 32, dtype=torch.bfloat16), w, None, w, None, lay, lay)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_follows_autocast_like_f_linear(backend):
    """Under bf16 autocast an fp32 input gives a bf16 output, as F.linear does, so the next
    matmul gets no bf16 → fp32 → bf16 round trip; the input gradient keeps the input's dtype."""
    gen = torch.Generator().manual_seed(0)
    mask = block_mask(torch.rand(64, 96, generator=gen), 1 / 3, 32)
    layout = BlockLayout.from_mask(mask, 32)
    w = (torch.randn(64, 96, generator=gen) * mask).requires_grad_()
    x = torch.randn(3, 96, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x, w, None, layout, backend)
        ref = torch.nn.functional.linear(x, w)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert block_sparse_linear(x, w, None, layout, backend).dtype == torch.float32


def test_prebuild_says_which_kernels_this_machine_uses(monkeypatch, capsys):
    kernels.prebuild()
    ready = kernels.cpp_extension() is not None
    assert ("C++ kernels ready" in capsys.readouterr().out) == ready
    _no_cpp(monkeypatch)  # as on a CPU without avx512_bf16
    kernels.prebuild()
    assert "sparse runs use pure torch" in capsys.readouterr().out


def test_chooser_names_still_import_from_kernels():
    """The chooser moved to kiln.sparsity.choose; its public names still import from kernels."""
    from kiln.sparsity.kernels import choose_kernel as old
    from kiln.sparsity.kernels import kernel_choice_reason, rank_candidates

    assert old is choose.choose_kernel and rank_candidates is choose.rank_candidates
    assert kernel_choice_reason is choose.kernel_choice_reason
    with pytest.raises(AttributeError):
        kernels.no_such_name  # noqa: B018
