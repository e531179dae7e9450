"""The block-sparse kernels as torch.library custom ops: opcheck, and torch.compile without
graph breaks on a tiny block-sparse MLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.sparsity import kernels
from kiln.sparsity.kernels import BlockLayout, BlockSparseLinear, masked_linear
from kiln.sparsity.patterns import block_mask

NEEDS_CPP = pytest.mark.skipif(
    kernels.cpp_extension() is None,
    reason="the C++ block-sparse kernels need a CPU with avx512_bf16 (and a build); none here",
)
NEEDS_AMX = pytest.mark.skipif(
    kernels.amx_extension() is None,
    reason="the AMX block-sparse kernels need a CPU with amx_tile and amx_bf16; none here",
)
BACKENDS = ["torch", pytest.param("cpp", marks=NEEDS_CPP), pytest.param("amx", marks=NEEDS_AMX)]


def _layout(out_f, in_f, b, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return BlockLayout.from_mask(block_mask(torch.rand(out_f, in_f, generator=gen), density, b), b)


def _linear_args(lay, dtype, with_bias, grads, tokens=7, backend="torch"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, lay.in_features, generator=gen).to(dtype)
    w = (torch.randn(lay.out_features, lay.in_features, generator=gen) * lay.to_mask()).to(dtype)
    b = torch.randn(lay.out_features, generator=gen).to(dtype) if with_bias else None
    for t, g in zip((x, w, b), grads):
        if t is not None:
            t.requires_grad_(g)
    return (x, w, b, lay.kept, lay.block_size, lay.nnzb, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,with_bias,grads",
    [
        (torch.float32, True, (True, True, True)),
        (torch.float32, False, (False, True, False)),
        (torch.bfloat16, True, (True, False, True)),
    ],
)
def test_block_sparse_linear_op_passes_opcheck(backend, dtype, with_bias, grads):
    if backend in ("cpp", "amx") and dtype == torch.float32:
        dtype = torch.bfloat16  # the C++ kernels compute in bf16
    args = _linear_args(_layout(96, 64, 32, 0.5), dtype, with_bias, grads, backend=backend)
    torch.library.opcheck(torch.ops.kiln.block_sparse_linear.default, args)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_block_sparse_mlp_op_passes_opcheck(backend):
    lay1, lay2 = _layout(128, 64, 32, 0.5), _layout(64, 128, 32, 0.5, seed=1)
    x, w1, b1, *_ = _linear_args(lay1, torch.bfloat16, True, (True, True, True), tokens=9)
    _, w2, b2, *_ = _linear_args(lay2, torch.bfloat16, True, (True, True, True))
    args = (x, w1, b1, lay1.kept, 32, lay1.nnzb, w2, b2, lay2.kept, 32, lay2.nnzb, backend)
    torch.library.opcheck(torch.ops.kiln.block_sparse_mlp.default, args)


def test_fake_kernel_shapes_follow_the_layout_not_the_weight():
    """The fake kernel derives y's width from the kept-block map (so a wrong map is caught by
    shape checks under compile): a map for 96 outputs gives 96 columns."""
    lay = _layout(96, 64, 32, 0.5)
    x, w, b, *rest = _linear_args(lay, torch.float32, True, (False,) * 3)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        y, saved = torch.ops.kiln.block_sparse_linear(x, w, b, *rest)
    assert tuple(y.shape) == (7, 96) and saved.numel() == 0


class TinySparseMLP(nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)) with both linears block-sparse (the torch kernel)."""

    def __init__(self, d=64, f=128, b=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        m1 = block_mask(torch.rand(f, d), 0.5, b)
        m2 = block_mask(torch.rand(d, f), 0.5, b)
        self.w1 = BlockSparseLinear(d, f, m1, b, backend="torch")
        self.w2 = BlockSparseLinear(f, d, m2, b, backend="torch")

    def forward(self, x):
        return x + self.w2(F.gelu(self.w1(self.norm(x))))


def test_compiled_block_sparse_mlp_has_no_graph_breaks_and_matches_eager(tmp_path, monkeypatch):
    """fullgraph=True raises on any graph break (Dynamo decides those, whatever the backend);
    the compiled fwd+bwd equals eager (fp32). The aot_eager backend runs the ops' fake kernels
    and autograd formulas through AOTAutograd in ~10 s here; with backend="inductor" the same
    test passes too but took ~50 s on 2 loaded cores, so the suite keeps aot_eager (Inductor
    is covered by test_sparse_training's compiled-run test)."""
    backend = "aot_eager"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinySparseMLP()
    x = torch.randn(2, 5, 64, requires_grad=True)
    grads = {}
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for name, fn in (("eager", model), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        y.square().sum().backward()
        grads[name] = [y.detach(), x.grad, model.w1.weight.grad, model.w2.bias.grad]
    for got, want in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the sparse gradient stays zero outside the kept blocks under compile too
    assert torch.all(model.w1.weight.grad[~model.w1.mask] == 0)
    ref = masked_linear(F.gelu(masked_linear(model.norm(x), model.w1.weight, model.w1.bias,
                                             model.w1.mask)), model.w2.weight, model.w2.bias,
                        model.w2.mask) + x  # fmt: skip
    torch.testing.assert_close(grads["compiled"][0], ref.detach(), rtol=1e-5, atol=1e-5)
