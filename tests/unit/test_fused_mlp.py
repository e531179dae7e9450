"""The token-tiled fused dense MLP: equals the unfused MLP (fp32, forward and every gradient),
is chosen only when measured faster, and swaps in without changing parameter names."""

import pytest
import torch
import torch.nn.functional as F

from kiln.config import TrainConfig
from kiln.errors import ConfigError
from kiln.models import fused_mlp
from kiln.models.fused_mlp import FusedGeluMLP, apply_fused_mlp, tiled_mlp
from kiln.models.gpt import GPT, GeluMLP, GPTConfig

SHAPE = GPTConfig(
    n_layers=2, d_model=48, n_heads=2, n_kv_heads=2, d_head=24, d_ffn=80, vocab_size=61,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "lead,d,f,tile,bias,approximate",
    [
        ((37,), 24, 40, 8, True, "none"),  # 37 tokens: 4 full tiles of 8 and one of 5
        ((3, 11), 16, 72, 16, False, "tanh"),  # 33 tokens over tiles of 16
        ((5,), 8, 24, 64, True, "none"),  # one tile larger than the input
    ],
)
def test_tiled_mlp_equals_unfused_forward_and_grads(lead, d, f, tile, bias, approximate):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, d, generator=gen, requires_grad=True)
    w1 = (torch.randn(f, d, generator=gen) / d**0.5).requires_grad_()
    w2 = (torch.randn(d, f, generator=gen) / f**0.5).requires_grad_()
    b1 = torch.randn(f, generator=gen).requires_grad_() if bias else None
    b2 = torch.randn(d, generator=gen).requires_grad_() if bias else None
    inputs = [t for t in (x, w1, b1, w2, b2) if t is not None]
    g = torch.randn(*lead, d, generator=gen)
    got = tiled_mlp(x, w1, b1, w2, b2, approximate, tile)
    want = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_some_grads_requested():
    x = torch.randn(9, 8)
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(8, 16)
    (dw1,) = torch.autograd.grad(tiled_mlp(x, w1, None, w2, None, tile=4).sum(), (w1,))
    (want,) = torch.autograd.grad(F.linear(F.gelu(F.linear(x, w1)), w2).sum(), (w1,))
    torch.testing.assert_close(dw1, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    """An empty $KILN_CACHE per test: apply_fused_mlp must not take an earlier test's choice."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "kiln-cache"))


def _fake_times(monkeypatch, times: dict[str, float]) -> None:
    """choose_fused_mlp sees these fwd+bwd times in the order it times the candidates."""
    order = iter(times.values())
    monkeypatch.setattr(fused_mlp, "_fwd_bwd_seconds", lambda *a, **k: next(order))


@pytest.mark.parametrize(
    "times,want",
    [
        ({"unfused": 1.0, "tile128": 2.0, "tile256": 1.5, "tile512": 1.2}, None),
        ({"unfused": 1.0, "tile128": 1.0, "tile256": 1.0, "tile512": 1.0}, None),  # tie: unfused
        ({"unfused": 1.0, "tile128": 0.9, "tile256": 0.7, "tile512": 0.8}, 256),
    ],
)
def test_chooser_uses_fused_only_when_measured_faster(monkeypatch, times, want):
    _fake_times(monkeypatch, times)
    tile, measured = fused_mlp.choose_fused_mlp(8, 16, 1024)
    assert tile == want and measured == {k: times[k] for k in measured}


def test_apply_swaps_mlps_keeps_names_and_matches_unfused_model(monkeypatch):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    ref = GPT(SHAPE)
    ref.load_state_dict(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    _fake_times(monkeypatch, {"unfused": 1.0, "tile128": 0.5, "tile256": 0.6, "tile512": 0.7})
    said = apply_fused_mlp(model, "auto", 32, "fp32")
    assert said.startswith("fused MLP: 2 MLPs token-tiled, tile 128")
    assert all(isinstance(b.mlp, FusedGeluMLP) for b in model.blocks.values())
    assert [n for n, _ in model.named_parameters()] == names
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    out, want = model(x), ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_apply_leaves_the_model_alone_when_off_slower_or_bf16(monkeypatch):
    model = GPT(SHAPE)
    assert apply_fused_mlp(model, "off", 32, "fp32") == "fused MLP: off"
    assert "not used (bf16 run" in apply_fused_mlp(model, "on", 32, "bf16")
    _fake_times(monkeypatch, {"unfused": 1.0, "tile128": 1.5, "tile256": 1.6, "tile512": 1.7})
    assert "unfused is faster here (unfused 1000.0 ms < tile128" in apply_fused_mlp(
        model, "auto", 32, "fp32"
    )
    assert all(type(b.mlp) is GeluMLP for b in model.blocks.values())


def test_fused_mlp_config_is_checked():
    with pytest.raises(ConfigError, match="fused_mlp"):
        TrainConfig(fused_mlp="yes")
