"""Sparse training: exact masks and levels, zeros and zero Adam moments across steps, GMP's
cubic schedule, SET/RigL keeping nnz with regrown weights at zero, SPDF's dense switch."""

import dataclasses
import math

import pytest
import torch

from kiln.config import SparsityConfig, TrainConfig
from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTConfig, cross_entropy
from kiln.sparsity import algorithms as alg
from kiln.sparsity import kernels as kernels_mod
from kiln.sparsity.apply import SparseGeluMLP, SparseLinear
from kiln.sparsity.callback import Runtime, build_sparsity
from kiln.sparsity.kernels import amx_extension, cpp_extension
from kiln.sparsity.masks import UnitSpec, distribute
from kiln.train.optim import build_optimizer

SHAPE = GPTConfig(
    n_layers=2, d_model=64, n_heads=2, n_kv_heads=2, d_head=32, d_ffn=128, vocab_size=97,
    max_seq_len=16, position="learned", norm="layernorm", activation="gelu", bias=True,
    tie_embeddings=True,
)  # fmt: skip


def setup(steps=20, **sparsity):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    model.init_weights()
    names = [n for n, _ in model.named_parameters()]
    opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    cfg = SparsityConfig(**sparsity)
    cb = build_sparsity(cfg, model, opt, Runtime(seed=0, max_steps=steps, tokens=32), lambda m: 0)
    assert [n for n, _ in model.named_parameters()] == names  # names survive the swap
    return model, opt, cb


def train(model, opt, cb, steps, start=0, inspect=None):
    gen = torch.Generator().manual_seed(start)
    for s in range(start, start + steps):
        x = torch.randint(0, 97, (4, 16), generator=gen)
        loss = cross_entropy(model(x), torch.roll(x, -1, 1))
        loss.backward()
        cb.after_backward(s)
        if inspect:
            inspect("backward", s)
        opt.step()
        cb.after_optimizer_step(s)
        if inspect:
            inspect("step", s)
        opt.zero_grad(set_to_none=True)


def assert_zeros(cb, opt):
    for layer in cb.layers:
        off = ~layer.module.mask
        assert torch.all(layer.param[off] == 0), layer.name
        state = opt.state.get(layer.param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert torch.all(state[key][off] == 0), (layer.name, key)


@pytest.mark.parametrize(
    "kw,density",
    [
        (dict(level=0.75, pattern="unstructured"), 0.25),
        (dict(level=0.5, pattern="2:4"), 0.5),
        (dict(level=0.75, pattern="block", block_size=16), 0.25),
        (dict(level=0.75, pattern="block", block_size=16, balanced=False), 0.25),
    ],
)
def test_masks_have_the_exact_pattern_and_level(kw, density):
    model, opt, cb = setup(**kw)
    assert len(cb.layers) == 12  # wq wk wv wo w1 w2 × 2 blocks; head, embeddings dense
    for layer in cb.layers:
        mask = layer.module.mask
        assert isinstance(layer.module, SparseLinear)
        assert mask.float().mean().item() == pytest.approx(density, abs=1e-9), layer.name
        assert torch.all(layer.param[~mask] == 0)
        if kw["pattern"] == "2:4":
            assert torch.all(mask.view(mask.shape[0], -1, 4).sum(-1) == 2)
        if kw["pattern"] == "block":
            b = 16
            r, c = mask.shape[0] // b, mask.shape[1] // b
            blocks = mask.view(r, b, c, b)
            assert torch.equal(blocks.all(dim=(1, 3)), blocks.any(dim=(1, 3)))  # whole blocks
            if kw.get("balanced", True):
                kept = blocks.any(dim=(1, 3))
                per_line = kept.sum(1) if mask.shape[1] >= mask.shape[0] else kept.sum(0)
                assert len(set(per_line.tolist())) == 1  # balanced


def test_per_param_overrides_and_erk_hits_the_overall_level():
    _, _, cb = setup(level=0.8, pattern="unstructured", distribution="erk",
                     per_param={"blocks.0.mlp.w1.weight": 0.5})  # fmt: skip
    numel = {layer.name: layer.param.numel() for layer in cb.layers}
    dens = {layer.name: layer.module.mask.float().mean().item() for layer in cb.layers}
    assert dens["blocks.0.mlp.w1.weight"] == pytest.approx(0.5)
    rest = [n for n in numel if n != "blocks.0.mlp.w1.weight"]
    kept = sum(dens[n] * numel[n] for n in rest) / sum(numel[n] for n in rest)
    assert kept == pytest.approx(0.2, abs=2e-3)
    # ERK: the square attention matrices (64+64)/(64·64) get more than the MLP (192)/(64·128)
    assert dens["blocks.1.attn.wq.weight"] > dens["blocks.1.mlp.w2.weight"]
    erk = distribute({"a": (10, 10), "b": (1000, 1000)}, {"a": math.nan, "b": math.nan}, 0.9, "erk")
    assert erk["a"] == 1.0 and 0 < erk["b"] < 0.1  # capped at 1, rest re-solved


def test_zeros_and_adam_moments_stay_zero_through_steps():
    model, opt, cb = setup(level=0.75, pattern="unstructured")
    masks = {layer.name: layer.module.mask.clone() for layer in cb.layers}
    train(model, opt, cb, 5)
    assert_zeros(cb, opt)
    for layer in cb.layers:
        assert torch.equal(layer.module.mask, masks[layer.name])  # static
        assert int(layer.param.count_nonzero()) == int(masks[layer.name].sum())


@pytest.mark.parametrize("kernel", ["masked", "block"])
def test_steady_steps_skip_the_masking_passes_and_zeros_still_survive(kernel, monkeypatch):
    """With unchanged masks the kernels' weight gradients are already zero outside the mask,
    and AdamW keeps a zero weight with zero moments and zero gradient exactly zero, so no
    masking pass over weights and moments runs, and nothing leaks."""
    model, opt, cb = setup(level=0.5, pattern="block", block_size=32, kernel=kernel)
    enforced = []
    real = cb._enforce
    monkeypatch.setattr(cb, "_enforce", lambda grown=None: (enforced.append(1), real(grown)))

    def inspect(phase, s):
        if phase == "backward":
            for layer in cb.layers:
                assert torch.all(layer.param.grad[~layer.module.mask] == 0), layer.name

    train(model, opt, cb, 4, inspect=inspect)
    assert enforced == [] and not cb.stale
    assert_zeros(cb, opt)


def test_gmp_follows_the_cubic_schedule():
    assert alg.gmp_level(0, 0.8, 0, 10, 2) == 0.0
    assert alg.gmp_level(5, 0.8, 0, 10, 2) == pytest.approx(0.8 * (1 - (1 - 4 / 10) ** 3))
    assert alg.gmp_level(10, 0.8, 0, 10, 2) == pytest.approx(0.8)
    assert alg.gmp_level(99, 0.8, 0, 10, 2) == pytest.approx(0.8)
    model, opt, cb = setup(level=0.75, pattern="unstructured", algorithm="gmp", start_step=2,
                           end_step=12, update_every=2)  # fmt: skip
    seen = {}

    def inspect(phase, s):
        if phase == "step":
            seen[s + 1] = sum(int((~lay.module.mask).sum()) for lay in cb.layers)

    train(model, opt, cb, 14, inspect=inspect)
    total = sum(layer.param.numel() for layer in cb.layers)
    for t, zeros in seen.items():
        want = 0.75 * (1 - (1 - (min(max(t, 2), 12) - 2 - (min(max(t, 2), 12) - 2) % 2) / 10) ** 3)
        assert zeros / total == pytest.approx(want, abs=2e-3), t
    assert_zeros(cb, opt)


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
@pytest.mark.parametrize("pattern", ["unstructured", "block"])
def test_set_and_rigl_keep_nnz_and_regrow_at_zero(algorithm, pattern):
    model, opt, cb = setup(level=0.75, pattern=pattern, block_size=16, algorithm=algorithm,
                           update_every=3, update_fraction=0.5, stop_step=12)  # fmt: skip
    nnz = {layer.name: layer.kept.sum(1).clone() for layer in cb.layers}
    before, changed, dense_grads = {}, [], []

    def inspect(phase, s):
        if phase == "backward":
            before.update({lay.name: lay.module.mask.clone() for lay in cb.layers})
            if algorithm == "rigl" and alg.dst_update_due(s + 1, 3, 12):
                dense_grads.append(all(lay.name in cb.grow_scores for lay in cb.layers))
            return
        for layer in cb.layers:
            assert torch.equal(layer.kept.sum(1), nnz[layer.name])  # per group, so per matrix
            grown = layer.module.mask & ~before[layer.name]
            if grown.any():
                changed.append(s + 1)
                assert torch.all(layer.param[grown] == 0)
                state = opt.state[layer.param]
                assert torch.all(state["exp_avg"][grown] == 0)
                assert torch.all(state["exp_avg_sq"][grown] == 0)

    train(model, opt, cb, 15, inspect=inspect)
    assert sorted(set(changed)) == [3, 6, 9]  # every ΔT before T_end = 12 (α_12 = 0)
    assert dense_grads == ([True] * 4 if algorithm == "rigl" else [])
    assert_zeros(cb, opt)


def test_rigl_steps_run_dense_and_grow_by_gradient():
    kept = torch.tensor([[True, True, False, False]])
    drop = torch.tensor([[5.0, 1.0, 0.0, 0.0]])
    grow = torch.tensor([[0.0, 0.0, 0.1, 9.0]])
    new, grown = alg.drop_and_grow(kept, drop, grow, 0.5)
    assert new.tolist() == [[True, False, False, True]] and grown.tolist() == [
        [False, False, False, True]
    ]
    model, opt, cb = setup(level=0.75, pattern="unstructured", algorithm="rigl", update_every=2,
                           stop_step=10)  # fmt: skip
    flags = []
    train(model, opt, cb, 4, inspect=lambda p, s: flags.append(cb.layers[0].module.dense_now))
    # step index 1 (update at t=2) and 3 (t=4) run dense; the flag is set for the *next* step
    assert flags[::2] == [True, False, True, False]


def test_spdf_becomes_dense_at_dense_step():
    model, opt, cb = setup(level=0.75, pattern="unstructured", algorithm="spdf", dense_step=4)
    train(model, opt, cb, 3)
    assert_zeros(cb, opt)
    assert not any(bool(layer.module.mask.all()) for layer in cb.layers)  # masks in force
    train(model, opt, cb, 3, start=3)
    assert cb.dense and all(layer.module.kernel == "dense" for layer in cb.layers)
    assert all(bool(layer.module.mask.all()) for layer in cb.layers)
    assert all(int(layer.param.count_nonzero()) == layer.param.numel() for layer in cb.layers)
    assert cb.metrics(6)["sparsity"] == 0.0


def test_state_dict_round_trip_restores_masks_and_rng():
    model, opt, cb = setup(level=0.75, pattern="unstructured", algorithm="set", update_every=2)
    train(model, opt, cb, 4)
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in cb.state_dict().items()}
    _, _, cb2 = setup(level=0.75, pattern="unstructured", algorithm="set", update_every=2)
    cb2.load_state_dict(state)
    for a, b in zip(cb.layers, cb2.layers):
        assert torch.equal(a.module.mask, b.module.mask) and torch.equal(a.kept, b.kept)
    assert torch.equal(cb.gen.get_state(), cb2.gen.get_state())


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(level=1.0), "must be in [0, 1)"),
        (dict(level=0.5, pattern="5:4"), "N <= M"),
        (dict(level=0.5, pattern="2:4", algorithm="gmp"), "fixes"),
        (dict(level=0.5, algorithm="rigl", update_fraction=0), "update_fraction"),
    ],
)
def test_bad_sparsity_config_values(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        SparsityConfig(**kw)


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(level=0.5, block_size=48), "does not divide blocks.0.attn.wq.weight"),
        (dict(per_param={"blocks.*.nothing": 0.5}), "matches no parameter"),
        (dict(level=0.5, include=["tok_emb.weight"]), "not an nn.Linear weight"),
        (dict(level=0.9, block_size=32), "not a whole number"),
    ],
)
def test_bad_sparsity_for_this_model(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        setup(**kw)


def test_unit_spec_round_trips_masks():
    spec = UnitSpec(64, 128, block=16, groups="cols")
    kept = torch.rand(8, 4) > 0.5
    assert torch.equal(spec.to_units(spec.expand(kept)), kept)


needs_cpp = pytest.mark.skipif(cpp_extension() is None, reason="no avx512_bf16 C++ kernels")


def _loss_and_grads(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(model(x), torch.roll(x, -1, 1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@needs_cpp
def test_fused_sparse_mlp_matches_the_masked_dense_model():
    model, _, cb = setup(level=0.5, pattern="block", block_size=32, kernel="block")
    mlps = [model.blocks[str(i)].mlp for i in range(SHAPE.n_layers)]
    assert all(isinstance(m, SparseGeluMLP) and m.fused for m in mlps)
    assert isinstance(mlps[0].w1, SparseLinear)  # the callback's layers drive the masks
    dense = GPT(SHAPE)
    dense.load_state_dict(model.state_dict())  # same names; masked weights are exact zeros
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, x)
    want_loss, want = _loss_and_grads(dense, x)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-2)
    for layer in cb.layers:  # sparse kernels return the masked gradient, the callback masks
        want[layer.name] = want[layer.name] * layer.module.mask
    for name, g in grads.items():  # bf16 tolerance; attn.wk.bias's true gradient is 0 (noise)
        err, scale = (g - want[name]).norm().item(), want[name].norm().item()
        assert err <= 0.03 * scale + 1e-5, (name, err, scale)


@needs_cpp
def test_fused_mlp_steps_aside_for_dense_steps_and_tanh():
    model, _, cb = setup(level=0.5, pattern="block", block_size=32, kernel="block",
                         algorithm="rigl", update_every=2, stop_step=10)  # fmt: skip
    mlp = model.blocks["0"].mlp
    calls = []
    real = kernels_mod._fused_mlp_call
    kernels_mod._fused_mlp_call = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train(model, cb.optimizer, cb, 2)
    finally:
        kernels_mod._fused_mlp_call = real
    # step 0 sparse (fused, 2 MLPs), step 1 dense for RigL's update at t=2 (no fused calls)
    assert len(calls) == 2 and mlp.fused
    torch.manual_seed(0)
    tanh = GPT(dataclasses.replace(SHAPE, activation="gelu_tanh"))
    opt = build_optimizer(tanh, TrainConfig(lr=1e-2))
    cfg = SparsityConfig(level=0.5, pattern="block", block_size=32, kernel="block")
    build_sparsity(cfg, tanh, opt, Runtime(seed=0, tokens=32), lambda m: 0)
    assert not isinstance(tanh.blocks["0"].mlp, SparseGeluMLP)  # the kernel has no tanh GELU


def test_compiled_sparse_model_trains_like_eager():
    """--train.compile with block-sparse layers: the kernels are torch.library custom ops (one
    opaque node each, allocations inside the op), and the compiled run's losses follow the
    eager run's."""
    from kiln.train.trainer import make_loss_fn

    shape = SHAPE.replace(d_model=64, d_ffn=128, vocab_size=97)
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(shape)
        opt = build_optimizer(model, TrainConfig(lr=1e-2))
        cfg = SparsityConfig(level=0.5, pattern="block", block_size=32, kernel="block")
        cb = build_sparsity(cfg, model, opt, Runtime(tokens=64), lambda m: 0)
        loss_fn = make_loss_fn(model, torch.device("cpu"), "bf16", compiled)
        x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
        losses[compiled] = []
        for step in range(3):
            loss = loss_fn(x, torch.roll(x, -1, 1))
            loss.backward()
            cb.after_backward(step)
            opt.step()
            cb.after_optimizer_step(step)
            opt.zero_grad(set_to_none=True)
            losses[compiled].append(loss.item())
        assert_zeros(cb, opt)
    assert losses[True] == pytest.approx(losses[False], abs=2e-3)


def test_dense_kernel_keeps_zeros_and_moments_exact():
    """The chooser may pick plain F.linear for a sparse layer (fastest where dense matmuls are
    fast): the callback then masks the gradient, so zeros and AdamW moments stay exactly zero."""
    model, opt, cb = setup(level=0.5, pattern="block", block_size=32, kernel="dense")
    assert all(layer.module.kernel == "dense" for layer in cb.layers)
    assert not any(layer.module.grad_is_masked for layer in cb.layers)
    train(model, opt, cb, 4)
    assert_zeros(cb, opt)
    assert all(abs(float(layer.module.mask.float().mean()) - 0.5) < 1e-6 for layer in cb.layers)


@pytest.mark.parametrize("kernel", ["masked", "block"])
def test_fusion_is_reported_after_kernels_are_chosen(kernel):
    if kernel == "block" and cpp_extension() is None:
        pytest.skip("no block-sparse C++ kernels on this CPU (needs avx512_bf16): nothing fuses")
    torch.manual_seed(0)
    model = GPT(SHAPE)
    model.init_weights()
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    lines: list[str] = []
    cfg = SparsityConfig(level=0.5, pattern="block", block_size=32, kernel=kernel)
    build_sparsity(cfg, model, opt, Runtime(seed=0, max_steps=4, tokens=32), lines.append)
    mlps = [m for m in model.modules() if isinstance(m, SparseGeluMLP)]
    fused = sum(m.fused for m in mlps)
    assert len(mlps) == 2 and fused == (2 if kernel == "block" else 0)
    if fused:  # kernel 'block' takes the best C++ kernel: AMX tiles where the CPU has them
        assert mlps[0].w1.kernel == ("block-amx" if amx_extension() is not None else "block-cpp")
    report = [line for line in lines if "GELU MLPs run" in line]
    assert report == [
        f"sparsity: {fused} of 2 GELU MLPs run fc1 → GELU → fc2 fused ("
        + (
            f"their linears use {mlps[0].w1.kernel})"
            if fused
            else "fusion needs both linears on one of block-amx, block-cpp)"
        )
    ]
