"""Causal bf16 CPU attention: the path (SDPA flash kernel or matmul) is the measured faster
one, set on every attention layer, honoured by the forward, and the config is checked."""

import pytest
import torch

from kiln.config import TrainConfig
from kiln.errors import ConfigError
from kiln.models import cpu_attention
from kiln.models.cpu_attention import apply_cpu_attention
from kiln.models.gpt import GPT, Attention, GPTConfig

SHAPE = GPTConfig(
    n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64, vocab_size=61,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip


def _paths(model):
    return {m.matmul_attention for m in model.modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("sdpa_s,matmul_s,want", [(0.02, 0.05, False), (0.05, 0.02, True)])
def test_auto_takes_the_faster_path_on_every_layer(monkeypatch, tmp_path, sdpa_s, matmul_s, want):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    seconds = iter([sdpa_s, matmul_s, sdpa_s, matmul_s])  # alternating rounds: sdpa, matmul
    monkeypatch.setattr(cpu_attention, "_fwd_bwd_seconds", lambda *a, **k: next(seconds))
    model = GPT(SHAPE)
    said = apply_cpu_attention(model, "auto", 2, 16, "bf16", "cpu")
    assert _paths(model) == {want}
    assert ("matmul path" if want else "SDPA flash kernel") in said, said
    assert "measured now" in said


def test_auto_choice_is_remembered_per_machine_and_shape(monkeypatch, tmp_path):
    """A second process (here: call) on the machine takes the choice the first one measured,
    without timing again, so a resumed run computes attention as the run it continues did;
    another shape is measured afresh."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    seconds = iter([0.05, 0.02, 0.05, 0.02])  # matmul faster
    monkeypatch.setattr(cpu_attention, "_fwd_bwd_seconds", lambda *a, **k: next(seconds))
    apply_cpu_attention(GPT(SHAPE), "auto", 2, 16, "bf16", "cpu")
    model = GPT(SHAPE)
    said = apply_cpu_attention(model, "auto", 2, 16, "bf16", "cpu")  # no timings left
    assert _paths(model) == {True} and "as measured earlier on this machine" in said, said
    seconds = iter([0.02, 0.05, 0.02, 0.05])  # sdpa faster at another batch
    assert "measured now" in apply_cpu_attention(model, "auto", 4, 16, "bf16", "cpu")
    assert _paths(model) == {False}


def test_forced_modes_and_cases_without_a_choice():
    model = GPT(SHAPE)
    apply_cpu_attention(model, "sdpa", 2, 16, "bf16", "cpu")
    assert _paths(model) == {False}
    apply_cpu_attention(model, "matmul", 2, 16, "bf16", "cpu")
    assert _paths(model) == {True}
    for args in [("fp32", "cpu"), ("bf16", "cuda")]:  # fp32 and GPUs always take SDPA
        assert apply_cpu_attention(model, "sdpa", 2, 16, *args).startswith("attention: SDPA (no")
        assert _paths(model) == {True}  # untouched: attention() sends these to SDPA anyway


def test_forward_honours_the_layer_choice(monkeypatch):
    """A layer set to SDPA calls scaled_dot_product_attention for causal bf16 CPU attention;
    both paths give the same loss within bf16 rounding."""
    from kiln.models import gpt

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention",
                        lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])  # fmt: skip
    torch.manual_seed(0)
    model = GPT(SHAPE)
    x = torch.randint(0, SHAPE.vocab_size, (2, 16))
    losses = []
    for mode in ("matmul", "sdpa"):
        apply_cpu_attention(model, mode, 2, 16, "bf16", "cpu")
        with torch.autocast("cpu", torch.bfloat16):
            losses.append(model(x, targets=x).item())
    assert len(calls) == SHAPE.n_layers  # only the sdpa pass
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_choice_is_measured_on_real_kernels():
    matmul, times = cpu_attention.choose_cpu_attention(1, 2, 32, 16, reps=1)
    assert set(times) == {"sdpa", "matmul"} and all(t > 0 for t in times.values())
    assert matmul == (times["matmul"] < times["sdpa"])


def test_cpu_attention_config_is_checked():
    assert TrainConfig().cpu_attention == "auto"
    with pytest.raises(ConfigError, match="cpu_attention"):
        TrainConfig(cpu_attention="flash")
