"""The expert-compute kernels: the zero-padded batched GEMM equals the per-token reference
forward and backward, and ``kernel: auto`` picks the fastest kernel by (injected) timings."""

import logging

import pytest
import torch
from tests.unit.test_moe import CASES, layer, reference

from kiln.models import moe_kernels
from kiln.models.moe_kernels import choose_expert_kernel, pad_positions


def grads(moe, x, fn):
    moe.zero_grad()
    x.grad = None
    y = fn(moe, x)
    y.square().sum().backward()
    named = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), named


@pytest.mark.parametrize("case", list(CASES))
def test_padded_bmm_equals_per_token_reference_forward_and_backward(case):
    moe = layer(**CASES[case], kernel="padded")
    with torch.no_grad():  # expert 3 gets no token
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
    x = torch.randn(21, 32, requires_grad=True)
    counts = torch.bincount(moe.route(x)[1].flatten(), minlength=4)
    assert counts[3] == 0 and any(c % 16 for c in counts.tolist())
    got = grads(moe, x, lambda m, x: m(x))
    want = grads(moe, x, reference)
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        assert torch.allclose(got[2][name], g, atol=1e-5, rtol=1e-5), name
    assert torch.all(got[2]["experts.w1"][3] == 0)


def test_pad_positions_place_each_expert_block_at_a_multiple_of_32_rows():
    pos, rows = pad_positions(torch.tensor([3, 0, 33, 1]))
    assert rows == 64
    assert pos.tolist() == [0, 1, 2, *range(128, 161), 192]


def fake_clock():
    """(timings to edit, kernels timed so far, a timer reading the timings) for the chooser."""
    fake = {"grouped": 3.0e-3, "padded": 1.0e-3, "loop": 2.0e-3}
    calls: list[str] = []

    def timer(kernel, x, counts, t, activation, reps):
        calls.append(kernel)
        return fake[kernel]

    return fake, calls, timer


def test_auto_picks_the_fastest_kernel_by_timing_once_per_shape(monkeypatch, caplog):
    monkeypatch.setattr(moe_kernels, "_CHOICES", {})
    fake, calls, timer = fake_clock()
    moe = layer(kernel="auto")
    x, counts = torch.randn(40, 32), torch.tensor([10, 12, 0, 18])
    t = moe.experts.local_tensors()
    with caplog.at_level(logging.INFO, logger="kiln.models.moe_kernels"):
        kernel, reason = choose_expert_kernel(x, counts, t, "swiglu", timer=timer)
    assert kernel == "padded" and sorted(calls) == ["grouped", "loop", "padded"]
    assert reason == "padded 1.0 ms < loop 2.0 ms < grouped 3.0 ms" and reason in caplog.text
    assert choose_expert_kernel(x, counts, t, "swiglu", timer=timer)[0] == "padded"
    assert len(calls) == 3  # cached per shape and dtype
    assert moe.experts.pick_kernel(x, counts) == "padded"  # the layer uses the cached choice
    fake["loop"] = 0.5e-3
    assert choose_expert_kernel(x.bfloat16(), counts, t, "swiglu", timer=timer)[0] == "loop"
    assert no_weight_gradients(moe)


def no_weight_gradients(moe) -> bool:
    return all(p.grad is None for p in moe.parameters())


def test_a_later_process_reuses_the_kernel_measured_on_this_machine(monkeypatch, tmp_path):
    """A resumed run (a new process) must compute with the kernel the run it continues chose:
    the measured choice is kept in $KILN_CACHE/hardware.json and read back, not re-timed."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(moe_kernels, "_CHOICES", {})
    fake, calls, timer = fake_clock()
    monkeypatch.setattr(moe_kernels, "_time_kernel", timer)
    x, counts = torch.randn(40, 32), torch.tensor([10, 12, 0, 18])
    t = layer(kernel="auto").experts.local_tensors()
    assert choose_expert_kernel(x, counts, t, "swiglu")[0] == "padded" and len(calls) == 3
    moe_kernels._CHOICES.clear()  # as in a new process
    fake["loop"] = 0.5e-3  # a re-measurement would now pick loop
    kernel, reason = choose_expert_kernel(x, counts, t, "swiglu")
    assert kernel == "padded" and "measured earlier" in reason and len(calls) == 3
    assert (tmp_path / "hardware.json").is_file()


def test_auto_measures_real_kernels_without_touching_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(moe_kernels, "_CHOICES", {})
    moe = layer(kernel="auto")
    x = torch.randn(20, 32)
    y = moe(x)
    ((key, (kernel, reason)),) = moe_kernels._CHOICES.items()
    assert kernel in reason and len(reason.split(" < ")) == 3
    assert no_weight_gradients(moe)
    assert torch.allclose(y, reference(moe, x), atol=1e-5, rtol=1e-5)
