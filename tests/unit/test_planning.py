"""Planning math: parameter/FLOP counts vs the published Cerebras-GPT table, plans, devices."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from kiln.errors import KilnError
from kiln.planning import (
    CEREBRAS_GPT,
    Shape,
    cerebras_flops,
    flops_6nd_plus_attention,
    flops_per_token,
    format_plan,
    hardware,
    make_plan,
    param_count,
    params_for_flops,
    peak_flops,
    shape_for_params,
    tokens_for,
    training_flops,
)

RUNS = list(CEREBRAS_GPT.values())
IDS = [r.name for r in RUNS]


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_param_count_matches_released_checkpoints(run):
    assert param_count(run.shape) == pytest.approx(run.params_exact, rel=0.01)
    # the round names (1.3B, 2.7B) are themselves rounded by up to ~2%
    assert param_count(run.shape) == pytest.approx(run.params, rel=0.025)


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_token_column_is_20_tokens_per_param(run):
    assert tokens_for(run.params) == pytest.approx(run.tokens, rel=0.05)
    assert tokens_for(param_count(run.shape)) == pytest.approx(run.tokens, rel=0.05)


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_published_flops_column_reproduced(run):
    assert cerebras_flops(run.shape, run.tokens) == pytest.approx(run.flops, rel=0.05)
    assert training_flops(run.shape, run.tokens, 2048, "cerebras") == cerebras_flops(
        run.shape, run.tokens
    )


def test_111m_arithmetic_in_docstring():
    s = CEREBRAS_GPT["cerebras-gpt-111m"].shape
    n = param_count(s)
    assert n == 111_050_496
    assert 6 * n + 30 * 10 * 2048 * 768 == pytest.approx(1.138e9, rel=1e-3)
    # plain 6ND is far from the published 2.6e18, so it cannot be the table's convention
    assert 6 * n * 2.22e9 < 0.6 * 2.6e18


def test_mfu_convention_is_6n_plus_12lsd():
    s = CEREBRAS_GPT["cerebras-gpt-1.3b"].shape
    n_mm = param_count(s, include_embeddings=False) + s.vocab_size * s.d_model
    expected = 6 * n_mm + 12 * s.n_layers * 2048 * s.d_model
    assert flops_per_token(s, 2048) == flops_6nd_plus_attention(s, 2048) == expected


def test_param_count_variants():
    base = Shape(n_layers=2, d_model=64, n_heads=4, d_ffn=256, vocab_size=100, max_seq_len=32)
    llama = Shape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ffn=256, vocab_size=100,
                  max_seq_len=32, activation="swiglu", tie_embeddings=False, bias=False,
                  position="rope", norm="rmsnorm")  # fmt: skip
    emb = 100 * 64 + 32 * 64
    layer = 4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 2 * 2 * 64
    assert param_count(base) == emb + 2 * layer + 2 * 64
    assert param_count(base, include_embeddings=False) == 2 * layer + 2 * 64
    kv = 2 * 16  # 2 kv heads × d_head 16
    layer_l = 64 * 64 + 2 * 64 * kv + 64 * 64 + 3 * 64 * 256 + 2 * 64
    assert param_count(llama) == 100 * 64 + 2 * layer_l + 64 + 100 * 64
    assert param_count(llama, include_embeddings=False) == 2 * layer_l + 64 + 100 * 64


def test_chinchilla_allocation():
    n = params_for_flops(2.4e21)
    assert 6 * n * tokens_for(n) == pytest.approx(2.4e21)
    assert n == pytest.approx((2.4e21 / 120) ** 0.5)
    for target in (1e8, 1e9, 1e10, 3e10):
        assert param_count(shape_for_params(target)) == pytest.approx(target, rel=0.05)
    s = shape_for_params(1.3e9)
    assert s.d_model % 64 == 0 and s.d_ffn == 4 * s.d_model and s.d_model == s.n_heads * 128


def test_plan_from_params_uses_20_tokens_per_param():
    plan = make_plan(params=1e9)
    assert plan.tokens == pytest.approx(20 * plan.params)
    assert plan.params == pytest.approx(1e9, rel=0.05)
    d = plan.to_dict()
    documented = {"params", "non_embedding_params", "tokens", "flops", "flops_6nd", "steps",
                  "batch_size", "seq_len", "lr", "warmup_steps", "schedule", "shape", "device",
                  "count", "mfu", "wall_clock_s"}  # fmt: skip
    assert documented <= d.keys()
    json.dumps(d)
    assert d["steps"] * d["batch_size"] * d["seq_len"] == pytest.approx(d["tokens"], rel=0.01)


def test_plan_for_preset_matches_cerebras_111m():
    plan = make_plan(preset="cerebras-gpt-111m", device="H100", count=16, mfu=0.4)
    assert plan.tokens == pytest.approx(2.22e9, rel=0.01)
    assert plan.batch_size == 120 and plan.steps == pytest.approx(9037, rel=0.01)
    assert plan.lr == pytest.approx(6e-4)
    assert plan.wall_clock_s == pytest.approx(plan.flops_model / (989e12 * 16 * 0.4))
    text = format_plan(plan)
    assert "1.11e8" in text and "2.22e9" in text and "16 × H100 at 40% MFU" in text


@pytest.mark.parametrize("name", sorted(CEREBRAS_GPT))
def test_plan_for_each_preset_reproduces_published_tokens_and_flops(name):
    run = CEREBRAS_GPT[name]
    d = make_plan(preset=name).to_dict()
    assert d["tokens"] == pytest.approx(run.tokens, rel=0.05)
    assert d["flops"] == pytest.approx(run.flops, rel=0.05)
    assert d["flops_model"] < d["flops"]  # MFU counts fewer attention FLOPs


def test_plan_from_flops_budget():
    plan = make_plan(flops=1e20, tokens_per_param=20)
    assert plan.flops_6nd == pytest.approx(1e20, rel=0.1)
    assert plan.to_dict()["flops_budget"] == 1e20


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"params": 1e8, "flops": 1e20},
        {"params": -5},
        {"params": 0},
        {"flops": float("nan")},
        {"params": 1e8, "tokens_per_param": 0},
        {"params": 1e8, "mfu": 1.5},
        {"params": 1e8, "count": 0},
        {"preset": "cerebras-gpt-111"},
        {"params": 1e8, "device": "abacus"},
    ],
)
def test_bad_plan_inputs_raise_one_sentence(kwargs):
    with pytest.raises(KilnError) as e:
        make_plan(**kwargs)
    msg = str(e.value)
    assert msg.endswith(".") and "\n" not in msg


def test_peak_table_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_flops("NVIDIA A10G")[0] == 70e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16")[0] == 125e12
    assert peak_flops("AMD Instinct MI300X")[0] == 1307e12
    with pytest.raises(KilnError):
        peak_flops("Quantum Abacus 9000")


def test_measure_cpu_peak_keeps_the_best_of_the_first_samples(tmp_path, monkeypatch):
    """A peak measured on a busy machine is too low: plain uses read the cache, refining uses
    (the end of a successful run) measure again until PEAK_SAMPLES samples and keep the best."""
    readings = iter([1.0e11, 5.0e11, 2.0e11, 9.0e11])
    calls = []

    def fake(device, precision, size, reps):
        calls.append((device, precision, size))
        return next(readings)

    monkeypatch.setattr(hardware, "_measure_matmul", fake)
    cache = tmp_path / "hw.json"
    assert hardware.measure_cpu_peak("fp32", cache_path=cache, size=64) == 1.0e11
    assert hardware.measure_cpu_peak("fp32", cache_path=cache, size=64) == 1.0e11
    assert len(calls) == 1  # cached: a plain use never measures again
    got = [hardware.measure_cpu_peak("fp32", cache_path=cache, size=64, refine=True)
           for _ in range(4)]  # fmt: skip
    assert got == [5.0e11, 5.0e11, 5.0e11, 5.0e11]
    assert len(calls) == hardware.PEAK_SAMPLES == 3
    ((key, entry),) = json.loads(cache.read_text()).items()
    assert hardware.cpu_model_name() in key and "fp32" in key and "threads=" in key
    assert entry["flops"] == 5.0e11 and entry["samples"] == 3


def test_measure_cpu_peak_upgrades_an_old_single_sample_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_measure_matmul", lambda *a: 7.0e11)
    cache = tmp_path / "hw.json"
    key = f"{hardware.cpu_model_name()}|threads={torch.get_num_threads()}|bf16|n=64"
    cache.write_text(json.dumps({key: {"flops": 2.0e11, "measured_at": "2026-01-01T00:00:00"}}))
    assert hardware.measure_cpu_peak("bf16", cache_path=cache, size=64) == 2.0e11
    assert hardware.measure_cpu_peak("bf16", cache_path=cache, size=64, refine=True) == 7.0e11


def test_measure_cpu_peak_tiny_real_matmul(tmp_path, monkeypatch):
    """2·n³ FLOPs over the fastest timed matmul: with a clock that advances 1 ms per reading,
    a 64² matmul is 2·64³ / 1 ms; the value is cached."""
    clock = iter(range(10_000))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(clock) * 1e-3)
    cache = tmp_path / "hw.json"
    flops = hardware.measure_cpu_peak("fp32", cache_path=cache, size=64, reps=2)
    assert flops == pytest.approx(2 * 64**3 / 1e-3)
    ((_, entry),) = json.loads(cache.read_text()).items()
    assert entry["flops"] == flops and entry["samples"] == 1


def test_planning_import_is_light():
    import subprocess

    code = "import sys, kiln.planning; print(sorted({'torch','numpy','scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_precision_auto_is_measured_not_assumed(monkeypatch):
    """'auto' picks the faster of bf16 and fp32 matmuls on this CPU (AVX2-only CPUs emulate
    bf16 ~10x slower; AMX/AVX512-BF16 ones run it faster than fp32); explicit values pass."""
    from kiln.planning import hardware

    peaks = {"bf16": 0.3e9, "fp32": 4e9}
    monkeypatch.setattr(hardware, "measure_cpu_peak", lambda p, **kw: peaks[p])
    pick, why = hardware.resolve_precision("auto", "cpu")
    assert pick == "fp32" and "bf16 matmul 0.3 vs fp32 4.0 GFLOP/s" in why
    peaks["bf16"] = 2000e9
    assert hardware.resolve_precision("auto", "cpu")[0] == "bf16"
    assert hardware.resolve_precision("fp32", "cpu") == ("fp32", "train.precision fp32")
    assert hardware.resolve_precision("bf16", "cpu")[0] == "bf16"


def test_default_warmup_serves_short_runs_and_keeps_5_percent_for_long_ones(monkeypatch):
    """One rule for kiln plan and kiln train: a 20-step run warms up over 5 steps (5% alone gave
    it 1 step at the full peak LR and a gradient-norm spike), long runs keep Cerebras-GPT's 5%."""
    from types import SimpleNamespace

    from kiln.config import JobConfig, TrainConfig
    from kiln.models.gpt import GPTConfig
    from kiln.planning.plan import default_warmup_steps
    from kiln.train import plan as train_plan
    from kiln.train.optim import LRSchedule

    expected = {1: 1, 2: 1, 8: 2, 20: 5, 60: 15, 100: 25, 400: 25, 500: 25, 1000: 50, 9037: 452}
    assert {s: default_warmup_steps(s) for s in expected} == expected
    assert all(1 <= default_warmup_steps(s) <= s for s in range(1, 3000))
    # the first update of a 20-step run is a fifth of the peak, not the peak
    schedule = LRSchedule(2e-3, default_warmup_steps(20), 20, 0.1, "cosine")
    assert schedule(0) == pytest.approx(2e-3 / 5)
    # both plans call it
    plan = make_plan(preset="cerebras-gpt-111m")
    assert plan.warmup_steps == default_warmup_steps(plan.steps) == 452
    monkeypatch.setattr(train_plan, "device_peak", lambda *a: (1e12, "test"))  # no measuring
    dims = SimpleNamespace(dp_size=1, world_size=1, device=torch.device("cpu"))
    job = JobConfig(train=TrainConfig(max_steps=20))
    shape = GPTConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64,
                      vocab_size=300, max_seq_len=256)  # fmt: skip
    assert train_plan.make_training_plan(shape, job, dims).warmup_steps == 5
    job = JobConfig(train=TrainConfig(max_steps=20, warmup_steps=0))
    assert train_plan.make_training_plan(shape, job, dims).warmup_steps == 0


def test_calibration_size_is_probed_once_per_machine(tmp_path, monkeypatch):
    """A start-up whose peaks are cached measures nothing: the probe that picks the
    calibration size is cached too."""
    probes = []

    def fake(device, precision, size, reps):
        probes.append(size)
        return 1.0e9 if precision == "bf16" else 1.0e10

    monkeypatch.setattr(hardware, "_measure_matmul", fake)
    cache = tmp_path / "hw.json"
    assert hardware.calibration_size("bf16", cache) == 512
    assert hardware.calibration_size("fp32", cache) == 2048
    assert len(probes) == 2
    hardware.measure_cpu_peak("bf16", cache_path=cache)
    hardware.measure_cpu_peak("bf16", cache_path=cache)
    assert probes == [256, 256, 512]


def test_start_up_plan_names_the_data_parallel_degree_and_the_layout(monkeypatch):
    """TP2 × PP2 on 8 ranks is 2 data-parallel ranks, not 8: the batch line says so."""
    from types import SimpleNamespace

    from kiln.config import JobConfig, TrainConfig
    from kiln.models.gpt import GPTConfig
    from kiln.train import plan as train_plan

    monkeypatch.setattr(train_plan, "device_peak", lambda *a: (1e12, "test"))  # no measuring
    shape = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=64,
                      vocab_size=300, max_seq_len=256)  # fmt: skip
    job = JobConfig(train=TrainConfig(max_steps=2, batch_size=8))
    cpu = torch.device("cpu")
    dims = SimpleNamespace(dp_size=2, world_size=8, tp=2, pp=2, ep=1, device=cpu)
    text = train_plan.make_training_plan(shape, job, dims).describe()
    assert "2 data-parallel rank(s) × micro-batch 4 × 1 accumulation step(s) " in text
    assert "(8 ranks: tp2 × pp2 × dp2)" in text
    dims = SimpleNamespace(dp_size=4, world_size=4, tp=1, pp=1, ep=2, device=cpu)
    text = train_plan.make_training_plan(shape, job, dims).describe()
    assert "× 1 accumulation step(s) (4 ranks: dp4 (ep2))" in text
    dims = SimpleNamespace(dp_size=1, world_size=1, device=cpu)  # one process: no layout
    assert train_plan.make_training_plan(shape, job, dims).describe().count("rank(s) ×") == 1
    assert "ranks:" not in train_plan.make_training_plan(shape, job, dims).describe()
