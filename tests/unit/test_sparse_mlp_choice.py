"""The GELU MLP as one timed choice (kiln.sparsity.mlp_choice), with injected timings: the
fastest of dense, the linears' own kernels and the fused block kernel wins, the log names every
candidate once with its time, the fused MLP runs only on linears that use the block kernel, and
a resumed run keeps the decision."""

import pytest
import torch

from kiln.config import SparsityConfig, TrainConfig
from kiln.models.gpt import GPT, GPTConfig, cross_entropy
from kiln.sparsity import choose, kernels, mlp_choice
from kiln.sparsity.apply import SparseGeluMLP
from kiln.sparsity.callback import Runtime, build_sparsity
from kiln.train.optim import build_optimizer

SHAPE = GPTConfig(
    n_layers=2, d_model=64, n_heads=2, n_kv_heads=2, d_head=32, d_ffn=128, vocab_size=97,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip
LINEAR_MS = {"dense": 2.0, "masked-dense": 3.0, "block32-cpp": 1.0, "block32-torch": 4.0}
PAIR = "per-linear(block-cpp, block-cpp)"


@pytest.fixture
def timed(monkeypatch):
    """Fixed timings: every linear picks block-cpp; the MLP candidates as each test sets them.
    The C++ kernels are declared present (only the choice is tested, nothing runs them)."""
    monkeypatch.setattr(kernels, "_EXT", object())
    monkeypatch.setattr(kernels, "_EXT_TRIED", True)
    monkeypatch.setattr(choose, "_CHOICES", {})
    monkeypatch.setattr(mlp_choice, "_CHOICES", {})
    monkeypatch.setattr(mlp_choice, "fused_backends", lambda: ["cpp"])
    seen: dict[str, int] = {}

    def linear(name, fn, x, weight, bias, mask, reps):
        return LINEAR_MS.get(name, 9.0) / 1e3  # e.g. an AMX candidate: slowest

    def mlp(name, problem, reps):
        seen[name] = seen.get(name, 0) + 1
        return mlp_ms[name] / 1e3

    mlp_ms: dict[str, float] = {}
    monkeypatch.setattr(choose, "_time_candidate", linear)
    monkeypatch.setattr(mlp_choice, "_time_mlp_candidate", mlp)
    return mlp_ms, seen


def build(kernel="auto"):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    model.init_weights()
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    lines: list[str] = []
    cfg = SparsityConfig(level=0.5, pattern="block", block_size=32, kernel=kernel)
    cb = build_sparsity(cfg, model, opt, Runtime(seed=0, max_steps=4, tokens=32), lines.append)
    return model, cb, lines


@pytest.mark.parametrize(
    ("ms", "choice", "kernel", "fused"),
    [
        ({"dense": 5.0, PAIR: 4.0, "fused-cpp": 3.0}, "fused-cpp", "block-cpp", True),
        ({"dense": 5.0, PAIR: 3.0, "fused-cpp": 4.0}, "per-linear", "block-cpp", False),
        ({"dense": 3.0, PAIR: 4.0, "fused-cpp": 5.0}, "dense", "dense", False),
        ({"dense": 4.0, PAIR: 4.0, "fused-cpp": 4.0}, "dense", "dense", False),  # ties: dense
    ],
)
def test_the_fastest_mlp_path_wins_and_every_candidate_is_logged_once(
    timed, ms, choice, kernel, fused
):
    mlp_ms, seen = timed
    mlp_ms.update(ms)
    model, cb, lines = build()
    assert seen == {name: 3 for name in ms}  # every candidate, in 3 rounds
    mlps = [m for m in model.modules() if isinstance(m, SparseGeluMLP)]
    assert len(mlps) == 2 and all(m.fused == fused for m in mlps)
    assert all(m.w1.kernel == m.w2.kernel == kernel for m in mlps)
    attn = {layer.module.kernel for layer in cb.layers if ".attn." in layer.name}
    assert attn == {"block-cpp"}  # the attention matrices keep their own choice
    ranked = " < ".join(f"{n} {ms[n]:.1f} ms" for n in sorted(ms, key=ms.get))
    want = f"sparsity: GELU MLP [128, 64] → [64, 128] at density 0.5000/0.5000 → {choice} "
    assert [line for line in lines if "GELU MLP [" in line] == [f"{want}({ranked})"]
    for line in lines:  # no line names a candidate twice
        names = [part.rsplit(" ", 2)[0] for part in line.split("(", 1)[-1].split(" < ")]
        assert len(names) == len(set(names)), line
    report = [line for line in lines if "GELU MLPs run" in line]
    assert len(report) == 1 and report[0].startswith(f"sparsity: {2 * fused} of 2 GELU MLPs")


def test_a_requested_block_kernel_fuses_without_timing(timed):
    mlp_ms, seen = timed
    model, _, lines = build(kernel="block")
    assert seen == {} and not any("GELU MLP [" in line for line in lines)
    mlps = [m for m in model.modules() if isinstance(m, SparseGeluMLP)]
    assert len(mlps) == 2 and all(m.fused for m in mlps)


def test_resume_keeps_the_mlp_decision(timed):
    mlp_ms, _ = timed
    mlp_ms.update({"dense": 5.0, PAIR: 3.0, "fused-cpp": 4.0})  # per-linear: not fused
    _, cb, _ = build()
    state = cb.state_dict()
    mlp_ms.update({"dense": 5.0, PAIR: 4.0, "fused-cpp": 3.0})  # a new run would fuse...
    mlp_choice._CHOICES.clear()
    model2, cb2, _ = build()
    assert all(m.fused for m in cb2.mlps)
    cb2.load_state_dict(state)  # ...the resumed one computes what the saved run did
    assert not any(m.fused for m in cb2.mlps)
    assert [m.fuse for m in cb2.mlps] == state["mlp_fuse"] == [False, False]


@pytest.mark.skipif(kernels.cpp_extension() is None, reason="no avx512_bf16 C++ kernels")
def test_a_timed_fused_choice_trains_like_the_linears_own_kernels(monkeypatch):
    """Real C++ kernels: with fusion timed fastest the loss and gradients equal the per-linear
    block kernels' (bf16 tolerance), and a real (untimed-by-injection) choice runs."""
    monkeypatch.setattr(mlp_choice, "_CHOICES", {})
    choice, reason = mlp_choice.choose_mlp(64, 128, 32, 32, (0.5, 0.5), ("dense", "dense"))
    names = [part.rsplit(" ", 2)[0] for part in reason.split(" < ")]
    assert sorted(names) == sorted(["dense", *(f"fused-{b}" for b in mlp_choice.fused_backends())])
    assert choice == ("per-linear" if names[0] == "dense" else names[0])
    results = []
    for fuse in (True, False):
        model, cb, _ = build(kernel="block")
        for mlp in cb.mlps:
            mlp.fuse = fuse
        assert all(m.fused == fuse for m in cb.mlps)
        x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cross_entropy(model(x), torch.roll(x, -1, 1))
        loss.backward()
        grads = [(layer.param.grad.clone(), layer.module.mask) for layer in cb.layers]
        results.append((loss.item(), grads))
    (fused_loss, fused_grads), (own_loss, own_grads) = results
    assert fused_loss == pytest.approx(own_loss, rel=1e-2)
    for (a, mask), (b, _) in zip(fused_grads, own_grads):
        assert (a - b).norm() <= 0.03 * b.norm() + 1e-5
        assert (a[~mask] == 0).all() and (b[~mask] == 0).all()  # zeros stay exactly zero
