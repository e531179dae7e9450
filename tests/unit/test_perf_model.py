"""The performance model (kiln.planning.perf) and ``kiln perf``: roofline per op, fusion,
sparsity checks, the hardware table and the CLI's errors."""

from __future__ import annotations

import json
import types

import pytest

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.models.gpt import GPTConfig
from kiln.models.presets import PRESETS
from kiln.planning import flops_per_token, ops, perf
from kiln.planning.hardware import DEVICES, PEAK_FLOPS, Device, perf_device

TINY = GPTConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_head=16, d_ffn=256,
                 vocab_size=64, max_seq_len=32)  # fmt: skip
# a round device: 1 TFLOP/s matmuls, 0.1 TFLOP/s vector, 1 GB/s, 1 MB on chip
TOY = Device("toy", 1e12, 1e11, 1e9, 1e6, None, "test", matmul_efficiency=1.0)


def test_roofline_of_one_op():
    op = ops.Op("x", "matmul", "fwd", 1e9, (ops.Tensor("a", 1e6),), (ops.Tensor("b", 1e6),), 3)
    c = perf.cost(op, TOY)
    assert c.compute_s == pytest.approx(3 * 1e9 / 1e12)
    assert c.memory_s == pytest.approx(3 * 2e6 / 1e9)
    assert c.time_s == c.memory_s and c.bound == "memory"
    ew = perf.cost(ops.Op("g", "activation", "fwd", 1e9, (), ()), TOY)
    assert ew.compute_s == pytest.approx(1e9 / 1e11)  # element-wise ops at the vector rate
    slow = Device("slow", 1e12, 1e11, 1e9, None, None, "test", 1.0, kernel_overhead_s=0.01)
    c = perf.cost(op, slow)
    assert c.time_s == pytest.approx(c.memory_s + 3 * 0.01) and c.bound == "overhead"


def test_fused_mlp_keeps_the_intermediate_on_chip_and_recomputes_it():
    step = ops.StepShape(batch=2, seq_len=32, precision="bf16")
    o = ops.training_ops(TINY, step)
    fused = {(c.name, c.phase): c for c in perf.fused_costs(o, TOY, step.tokens, tile=16)}
    fwd, bwd = fused[("mlp (fused)", "fwd")], fused[("mlp (fused)", "bwd")]
    M, d, f, L = 64, 64, 256, 2
    # forward reads x, W1, W2 (bf16) and writes only the output: [M × f] never leaves the chip
    assert fwd.bytes == L * (M * d * 2 + 2 * d * f * 2 + M * d * 2)
    kbk = [perf.cost(x, TOY) for x in o if x.fuse == "mlp" and x.phase == "fwd"]
    assert sum(c.bytes for c in kbk) - fwd.bytes == L * 4 * M * f * 2  # h, g written and read
    # backward recomputes GEMM1 (and GELU) instead of reading h from memory
    w1 = next(x for x in o if x.name == "mlp.w1")
    gelu = next(x for x in o if x.name == "mlp.gelu")
    kbk_bwd = sum(x.flops for x in o if x.fuse == "mlp" and x.phase == "bwd")
    assert bwd.flops == L * (kbk_bwd + w1.flops + gelu.flops)
    # on chip: both weights + the [tile × f] intermediates
    assert fwd.onchip_bytes == 2 * d * f * 2 + (M * f * 2 * 2) * 16 / M


def test_fusing_only_some_groups_leaves_the_other_ops_kernel_by_kernel():
    """groups={"attn"}: the step as an eager run with a flash attention kernel executes it."""
    step = ops.StepShape(batch=2, seq_len=32, precision="bf16")
    o = ops.training_ops(TINY, step)
    mixed = perf.fused_costs(o, TOY, step.tokens, groups={"attn"})
    fused_names = {c.name for c in mixed if c.kind == "fused"}
    assert fused_names == {"attn (fused)"}
    assert [c.phase for c in mixed if c.kind == "fused"] == ["fwd", "bwd"]
    rest = [perf.cost(x, TOY) for x in o if x.fuse != "attn"]
    assert [c.name for c in mixed if c.kind != "fused"] == [c.name for c in rest]
    every = [c.time_s for c in perf.fused_costs(o, TOY, step.tokens) if c.name == "attn (fused)"]
    assert [c.time_s for c in mixed if c.kind == "fused"] == every  # same group costs


def test_a_measured_attention_rate_applies_to_attention_ops_only():
    slow_attn = Device("toy", 1e12, 1e11, 1e9, 1e6, None, "test", 1.0, attention_flops=1e10)
    att = ops.Op("attn.scores", "attention", "fwd", 1e9)
    mm = ops.Op("mlp.w1", "matmul", "fwd", 1e9)
    assert perf.cost(att, slow_attn).compute_s == pytest.approx(1e9 / 1e10)
    assert perf.cost(mm, slow_attn).compute_s == pytest.approx(1e9 / 1e12)
    assert perf.cost(att, TOY).compute_s == pytest.approx(1e9 / 1e12)  # None: the matmul rate
    soft = ops.Op("attn.softmax", "softmax", "fwd", 1e7, reads=(ops.Tensor("s", 1e8, "act"),))
    assert perf.cost(soft, TOY).time_s > 0
    inside = perf.cost(soft, slow_attn)  # timed inside the attention path: no time of its own
    assert inside.time_s == 0 and inside.flops == 1e7 and inside.bytes == 1e8
    step = ops.StepShape(batch=2, seq_len=32, precision="bf16")
    o = ops.training_ops(TINY, step)
    fast = sum(c.compute_s for c in perf.fused_costs(o, TOY, 64) if c.name == "attn (fused)")
    slow = sum(c.compute_s for c in perf.fused_costs(o, slow_attn, 64) if c.name == "attn (fused)")
    assert slow > 50 * fast  # the fused group's matmuls run at the measured rate too


def test_gemm_mix_rate_is_total_flops_over_total_time(monkeypatch):
    from kiln.planning import cpu_calibration

    clock = iter([0.0, 3.0, 0.0, 6.0])  # 1 s per call of the first GEMM, 2 s of the second
    fake = types.SimpleNamespace(perf_counter=lambda: next(clock))
    monkeypatch.setattr(cpu_calibration, "time", fake)  # only this module's clock
    rate = cpu_calibration.measure_gemm_mix([(2, 2, 2, False, 1), (2, 2, 4, True, 2)], "fp32")
    assert rate == pytest.approx((16 + 2 * 32) / (1 * 1.0 + 2 * 2.0))


def test_sparsity_makes_the_kbk_mlp_memory_bound_but_not_the_fused_one():
    dev = Device("balanced", 1e12, 1e12, 50e9, 1e9, None, "test", matmul_efficiency=1.0)
    cfg = PRESETS["cerebras-gpt-111m"]

    def mlp_bound(density):
        step = ops.StepShape(batch=1, seq_len=2048, density=density)
        o = ops.training_ops(cfg, step)
        kbk = [perf.cost(x, dev) for x in o if x.fuse == "mlp" and x.phase == "fwd"]
        fused = [c for c in perf.fused_costs(o, dev, step.tokens) if c.name == "mlp (fused)"]
        return sum(c.memory_s for c in kbk) / sum(c.compute_s for c in kbk), fused[0].bound

    dense_ratio, _ = mlp_bound(1.0)
    sparse_ratio, fused_bound = mlp_bound(0.125)
    assert sparse_ratio > dense_ratio * 4  # 8× fewer FLOPs, same activation traffic
    assert fused_bound == "compute"


def test_totals_agree_with_kiln_plan():
    cfg = PRESETS["cerebras-gpt-13b"]
    step = ops.StepShape(batch=2, seq_len=2048)
    r = perf.predict(cfg, step, perf_device("H100"), "13b")
    assert r.model_flops == flops_per_token(cfg, 2048) * step.tokens
    d = r.to_dict()
    assert d["step_time_fused_s"] < d["step_time_kbk_s"]
    assert d["bytes_fused"] < d["bytes_kbk"]
    assert 0 < d["mfu_fused"] <= DEVICES["H100"].matmul_efficiency


def test_hardware_table_has_a_source_per_entry_and_matches_the_peak_table():
    for name, dev in DEVICES.items():
        assert dev.source and len(dev.source) > 30, name
        if dev.peak_bf16 is None or dev.offchip_bw is None:
            assert "not published" in dev.source or "no dense" in dev.source, name
    for name in ("A100", "H200", "MI300X"):
        assert DEVICES[name].peak_bf16 == pytest.approx(PEAK_FLOPS[name]["bf16"], rel=1e-3)
    assert DEVICES["H100"].peak_bf16 == PEAK_FLOPS["H100-SXM"]["bf16"]


@pytest.mark.parametrize(
    "level,pattern,block,match",
    [(0.875, "block", 32, None), (0.5, "2:4", 32, None), (0.9, "block", 32, "whole number"),
     (0.75, "2:4", 32, "holds sparsity 0.5"), (0.5, "block", 100, "does not divide"),
     (1.0, "block", 32, r"\[0, 1\)")],
)  # fmt: skip
def test_check_sparsity(level, pattern, block, match):
    cfg = PRESETS["cerebras-gpt-111m"]
    if match is None:
        assert perf.check_sparsity(cfg, level, pattern, block) == pytest.approx(1 - level)
    else:
        with pytest.raises(ConfigError, match=match):
            perf.check_sparsity(cfg, level, pattern, block)


def test_cli_json_and_table(capsys):
    assert main(["perf", "--preset", "cerebras-gpt-13b", "--device", "H100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"]["name"] == "H100" and out["step"]["seq_len"] == 2048
    names = {r["name"] for r in out["ops_kbk"]}
    assert {"mlp.w1", "attn.softmax", "adamw", "mlp.gelu.bwd"} <= names
    argv = ["perf", "--preset", "cerebras-gpt-111m", "--device", "a100",
            "--sparsity.level", "0.875", "--data.seq_len", "512"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "87.50% sparse" in text and "mlp (fused)" in text and "MFU" in text


@pytest.mark.parametrize(
    "argv,match",
    [(["--device", "tpu-v9"], "not in the hardware table"),
     (["--device", "CS-2"], "no published peak_bf16"),
     (["--sparsity.level", "0.9"], "whole number"),
     (["--sparsity.level", "0.5", "--sparsity.block_size", "100"], "does not divide")],
)  # fmt: skip
def test_cli_bad_input_is_one_sentence_exit_2(argv, match, capsys):
    assert main(["perf", "--preset", "cerebras-gpt-111m", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert match.split("\\")[0] in err


def test_cpu_bandwidth_is_measured_once_and_cached(tmp_path):
    from kiln.planning.hardware import measure_cpu_bandwidth

    path = tmp_path / "hardware.json"
    bw = measure_cpu_bandwidth(path, mbytes=8, reps=2)
    assert bw > 1e8  # any machine copies faster than 100 MB/s
    assert measure_cpu_bandwidth(path, mbytes=8, reps=2) == bw
    assert "copy-bandwidth" in path.read_text()


def test_mlp_chain_panels_shape():
    pts = perf.mlp_chain(TINY, ops.StepShape(batch=2, seq_len=32), (0.0, 0.5, 0.75))
    d, f = 64, 256
    assert [p.sparsity for p in pts] == [0.0, 0.5, 0.75]
    for p in pts:
        assert p.bytes_fused < p.bytes_kbk and p.flops_fused > p.flops_kbk  # recomputation
    # KBK traffic keeps the dense activations; the kept weights shrink with density: W1, W2
    # read forward and by dgrad, dW1, dW2 written by wgrad, each d·f bf16 × density
    assert pts[0].bytes_kbk - pts[1].bytes_kbk == pytest.approx(0.5 * 6 * d * f * 2)
    assert pts[2].onchip_fused < pts[1].onchip_fused < pts[0].onchip_fused
    need = [p.bandwidth_needed(TOY, False) for p in pts]
    assert need[0] < need[1] < need[2]
    assert pts[0].time(TOY, False) == pytest.approx(
        max(pts[0].flops_kbk / 1e12, pts[0].bytes_kbk / 1e9)
    )


def test_fresh_writes_cost_the_fresh_write_bandwidth():
    op = ops.Op("y", "elementwise", "fwd", 0.0, (ops.Tensor("x", 1e6),),
                (ops.Tensor("y", 2e6, "act"), ops.Tensor("p", 1e6, "weight")))  # fmt: skip
    cpu = Device("cpu", 1e12, 1e12, 1e9, None, None, "test", 1.0, fresh_write_bw=0.5e9)
    # reads and the in-place weight write at 1 GB/s, the new activation at 0.5 GB/s
    assert perf.cost(op, cpu).memory_s == pytest.approx(2e6 / 1e9 + 2e6 / 0.5e9)
    assert perf.cost(op, TOY).memory_s == pytest.approx(4e6 / 1e9)


def test_elementwise_calibration_fit_recovers_line_and_clamps():
    from kiln.planning.hardware import fit_overhead_bandwidth

    pts = [(b, 2e-5 + b / 5e9) for b in (1e6, 4e6, 1.6e7)]
    bw, overhead = fit_overhead_bandwidth(pts)
    assert bw == pytest.approx(5e9) and overhead == pytest.approx(2e-5)
    bw, overhead = fit_overhead_bandwidth([(1e6, 1e-4), (2e6, 3e-4)])  # intercept < 0
    assert overhead == 0.0 and bw == pytest.approx((1e12 + 4e12) / (1e2 + 6e2))


def test_elementwise_bandwidth_applies_to_elementwise_kinds_only():
    dev = Device("x", 1e12, 1e12, 1e10, None, None, "test", 1.0, 1e9, 0.0, elementwise_bw=2e9)
    t = [ops.Tensor("a", 4e6), ops.Tensor("w", 4e6, "weight")]
    assert perf.memory_seconds(t, [], dev, "activation") == pytest.approx(8e6 / 2e9)
    assert perf.memory_seconds(t, [], dev, "matmul") == pytest.approx(8e6 / 1e10)


def test_tiled_mlp_costs_recompute_and_per_tile_weight_traffic():
    """Token-tiled MLP (kiln.models.fused_mlp): 7/6 of the unfused matmul FLOPs; activations
    5 × T·d·4 off-chip, weights and weight gradients 9 × d·f·4 per tile; no T·f traffic."""
    T, d, f, tile = 1000, 16, 64, 256
    dev = Device("x", 1e12, 1e12, 1e10, None, None, "test", 1.0, None, 1e-6, elementwise_bw=1e9)
    unfused = perf.mlp_costs(T, d, f, None, dev)
    tiled = perf.mlp_costs(T, d, f, tile, dev)
    mm = lambda rows: sum(c.flops for c in rows if c.kind == "matmul")  # noqa: E731
    assert mm(tiled) == pytest.approx(7 / 6 * (mm(unfused) - T * (f + d)))  # less bias adds
    assert tiled[0].bytes == 5 * T * d * 4 + 4 * 9 * d * f * 4  # 4 tiles of ≤ 256 tokens
    assert sum(c.bytes for c in unfused) > 8 * T * f * 4  # h, g, dg, dh written and read
    assert tiled[0].overhead_s == pytest.approx(4 * 5 * 1e-6)
