"""The layout planner (kiln.planning.layout) and ``kiln plan --cluster``: pure arithmetic on
tiny shapes, no processes started."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.planning import cluster as cluster_mod
from kiln.planning import layout as lay_mod
from kiln.planning.flops import Shape
from kiln.planning.layout import (
    USABLE,
    Layout,
    bubble_fraction,
    enumerate_layouts,
    in_flight,
    make_cluster,
    parallel_yaml,
    parse_cluster,
    predict_layout,
    recommend,
)

# heads 4, kv heads 2, d_ffn 96: tp 4 divides heads and d_ffn but not kv heads
TINY = Shape(n_layers=4, d_model=64, n_heads=4, d_ffn=96, vocab_size=128, max_seq_len=64,
             n_kv_heads=2, tie_embeddings=False)  # fmt: skip


def test_enumeration_respects_every_divisibility_rule():
    layouts = enumerate_layouts(TINY, 8, 16)
    assert layouts
    for x in layouts:
        assert x.tp * x.pp * x.dp_replicate * x.dp_shard == 8
        assert 4 % x.tp == 0 and 2 % x.tp == 0 and 96 % x.tp == 0
        assert x.pp * x.stages_per_rank <= 4
        assert x.dp * x.micro_batch * x.microbatches == 16
        if x.pp > 1:
            assert x.microbatches >= x.pp
        if x.schedule == "Interleaved1F1B":
            assert x.microbatches % x.pp == 0
        if x.data == "ddp":
            assert x.dp_shard == 1
    degrees = {(x.tp, x.pp) for x in layouts}
    assert (2, 2) in degrees and (1, 4) in degrees and (2, 4) in degrees
    assert not any(x.tp == 4 for x in layouts)  # kv heads 2
    assert not any(x.pp == 8 for x in layouts)  # 4 layers
    # tied embeddings: kiln's pipeline refuses them, so no pp > 1
    tied = Shape(**{**TINY.__dict__, "tie_embeddings": True})
    assert {x.pp for x in enumerate_layouts(tied, 8, 16)} == {1}
    assert {x.tp for x in enumerate_layouts(TINY, 8, 16, tp=2)} == {2}


def test_degrees_contradicting_the_world_are_refused():
    with pytest.raises(ConfigError, match="does not divide"):
        enumerate_layouts(TINY, 8, 16, tp=3)
    with pytest.raises(ConfigError, match="does not divide"):
        enumerate_layouts(TINY, 8, 16, tp=2, pp=8)


def test_bubble_formulas():
    assert bubble_fraction("1F1B", 1, 8) == 0
    assert bubble_fraction("GPipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1F1B", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("Interleaved1F1B", 4, 8, 2) == pytest.approx(1.5 / 9.5)
    assert bubble_fraction("ZBVZeroBubble", 4, 8, 2) == 0
    assert in_flight("GPipe", 4, 8) == 8 and in_flight("1F1B", 4, 8) == 4
    assert in_flight("Interleaved1F1B", 4, 8, 2) == pytest.approx(5.5)


def test_a_layout_that_cannot_fit_is_never_recommended():
    big = Shape(n_layers=8, d_model=1024, n_heads=8, d_ffn=4096, vocab_size=1000,
                max_seq_len=512, tie_embeddings=False)  # fmt: skip
    roomy = make_cluster("H100", 1, 8)
    tight = make_cluster("H100", 1, 8, memory_gb=0.6)
    every = [predict_layout(big, x, tight, 512) for x in enumerate_layouts(big, 8, 64)]
    fastest = min(every, key=lambda p: p.step_s)
    assert not fastest.fits and any(p.fits for p in every)  # memory binds on the tight one
    picks = recommend(big, tight, 64, 512, top=50)
    assert picks and all(p.memory["peak"] <= USABLE * tight.memory_bytes for p in picks)
    assert fastest.layout not in {p.layout for p in picks}
    assert recommend(big, roomy, 64, 512, top=1)[0].step_s <= picks[0].step_s
    with pytest.raises(ConfigError, match=r"needs [\d.]+ GB per device"):
        recommend(big, make_cluster("H100", 1, 8, memory_gb=0.01), 64, 512)


def test_memory_shrinks_with_sharding_and_checkpointing():
    c = make_cluster("A100", 1, 8)
    base = Layout(1, 1, 8, 1, 2, 1, data="ddp")
    mem = lambda x: predict_layout(TINY, x, c, 64).memory  # noqa: E731
    assert mem(Layout(1, 1, 1, 8, 2, 1))["optimizer"] == pytest.approx(
        mem(base)["optimizer"] / 8, rel=0.01
    )
    assert mem(Layout(2, 1, 4, 1, 2, 1, data="ddp"))["params"] == pytest.approx(
        mem(base)["params"] / 2
    )
    ac = Layout(1, 1, 8, 1, 2, 1, activation_checkpointing=True, data="ddp")
    assert mem(ac)["activations"] < mem(base)["activations"]


def test_yaml_snippet_parses_with_the_config_names():
    pipe = Layout(2, 2, 1, 2, 1, 4, "Interleaved1F1B", 2, True, "fsdp")
    sec = yaml.safe_load(parallel_yaml(pipe))["parallel"]
    assert sec == {"data": "fsdp", "tensor": 2, "pipeline": 2, "data_replicate": 1,
                   "activation_checkpointing": True, "pipeline_schedule": "Interleaved1F1B",
                   "microbatches": 4, "stages_per_rank": 2}  # fmt: skip
    flat = yaml.safe_load(parallel_yaml(Layout(1, 1, 8, 1, 1, 2, data="ddp")))["parallel"]
    assert flat["data"] == "ddp" and "pipeline_schedule" not in flat


def test_cluster_specs():
    c = parse_cluster("64xH100")
    assert (c.nodes, c.devices_per_node, c.device.name, c.memory_bytes) == (8, 8, "H100", 80e9)
    c = parse_cluster("4x8xA100-40GB")
    assert (c.nodes, c.world, c.memory_bytes) == (4, 32, 40e9)
    c = parse_cluster("16xMI300X")  # the device name has an x in it
    assert (c.nodes, c.device.name, c.memory_bytes) == (2, "MI300X", 192e9)
    assert parse_cluster("2x4xMI300X").world == 8
    for bad in ("64xB300", "sixtyfourxH100", "0xH100", "12xH100", "2x0xH100"):
        with pytest.raises(ConfigError):
            parse_cluster(bad)


def test_cluster_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("device: H200\nnodes: 2\ndevices_per_node: 4\ninter_node_gbps: 25\n")
    c = parse_cluster(str(f))
    assert (c.world, c.memory_bytes, c.inter_bw) == (8, 141e9, 25e9)
    f.write_text("device: H200\ngpus: 3\n")
    with pytest.raises(ConfigError, match="mapping with device"):
        parse_cluster(str(f))


def test_cli_recommends_and_writes(tmp_path, capsys):
    out = tmp_path / "parallel.yaml"
    argv = ["plan", "--preset", "cerebras-gpt-111m", "--cluster", "2x4xH100", "--top", "3",
            "--global-batch", "64", "--json", "--write-parallel", str(out)]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["layouts"]) == 3
    steps = [x["step_s"] for x in d["layouts"]]
    assert steps == sorted(steps)
    assert yaml.safe_load(out.read_text())["parallel"]["tensor"] == d["layouts"][0]["layout"]["tp"]
    assert main(argv) == 2  # never overwrites


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--cluster", "8xB300"], "cannot be planned for"),
        (["--cluster", "1x1xA100-40GB"], "needs"),
        (["--cluster", "64xH100", "--tensor", "3"], "does not divide"),
        (["--tensor", "2"], "need --cluster"),
    ],
)
def test_cli_bad_input_exits_2(flags, needle, capsys):
    assert main(["plan", "--preset", "cerebras-gpt-13b", *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_experts_hook_only_for_models_with_experts():
    assert all(x.ep == 1 for x in enumerate_layouts(TINY, 8, 16))
    moe = lay_mod.Layout(1, 1, 1, 4, 1, 4, ep=2)
    assert "experts" in lay_mod.check_layout(TINY, moe, 8, 16)


def test_yaml_snippet_round_trips_into_parallel_config():
    from kiln.config import ParallelConfig

    if "tensor" not in ParallelConfig.__dataclass_fields__:
        pytest.skip("needs issue-12's ParallelConfig (tensor, pipeline, ... fields)")
    for x in (Layout(2, 2, 1, 2, 1, 4, "Interleaved1F1B", 2, True, "fsdp"),
              Layout(8, 1, 2, 4, 3, 5), Layout(1, 1, 8, 1, 1, 2, data="ddp"),
              Layout(2, 1, 1, 4, 1, 2, offload=True)):  # fmt: skip
        sec = yaml.safe_load(parallel_yaml(x))["parallel"]
        cfg = ParallelConfig(**sec)
        assert (cfg.tensor, cfg.pipeline, cfg.data, cfg.activation_checkpointing,
                cfg.cpu_offload) == (x.tp, x.pp, x.data, x.activation_checkpointing,
                                     x.offload)  # fmt: skip


def test_step_time_parts_follow_the_layout():
    s = Shape(n_layers=8, d_model=256, n_heads=8, d_ffn=1024, vocab_size=512, max_seq_len=128,
              tie_embeddings=False)  # fmt: skip
    one_node, spread = make_cluster("H100", 1, 8), make_cluster("H100", 4, 2)
    tp8 = Layout(8, 1, 1, 1, 1, 4)
    assert (
        predict_layout(s, tp8, spread, 128).parts["tp"]
        > predict_layout(s, tp8, one_node, 128).parts["tp"] * 5
    )  # across nodes at the NIC's bandwidth
    one_f = predict_layout(s, Layout(1, 4, 1, 2, 1, 4, "1F1B"), one_node, 128)
    zbv = predict_layout(s, Layout(1, 4, 1, 2, 1, 4, "ZBVZeroBubble", 2), one_node, 128)
    assert zbv.parts["bubble"] == 0 < one_f.parts["bubble"]
    busy = one_f.parts["compute"] + one_f.parts["recompute"]
    assert one_f.parts["bubble"] / (busy + one_f.parts["bubble"]) == pytest.approx(3 / 7)
    ac = predict_layout(s, Layout(1, 1, 1, 8, 1, 4, activation_checkpointing=True), one_node, 128)
    assert (
        ac.parts["recompute"] > 0
        and ac.step_s > predict_layout(s, Layout(1, 1, 1, 8, 1, 4), one_node, 128).step_s
    )


def _fake_cpu(monkeypatch, fp32=20e9, bf16=1e9, memory=16e9):
    """A calibrated CPU without measuring anything (the calibration has its own tests)."""
    from kiln.planning.hardware import Device

    dev = Device("cpu", bf16, fp32, 10e9, None, None, "fake", 1.0, 5e9, 1e-5)
    monkeypatch.setattr(cluster_mod, "_one_thread_cpu", lambda cache_path: dev)
    monkeypatch.setattr(cluster_mod, "_host_memory", lambda: memory)
    monkeypatch.setattr(cluster_mod, "measure_collectives", lambda n, cache_path=None: ())
    return dev


def test_local_cluster_is_this_machine_with_n_processes(monkeypatch):
    dev = _fake_cpu(monkeypatch)
    two = cluster_mod.local_cluster(2, cores=2)
    four = cluster_mod.local_cluster(4, cores=2, link_gbps=0.5)
    assert (two.world, two.nodes, two.memory_bytes, two.precision, two.memory_device) == (
        2, 1, 8e9, "fp32", "cpu")  # fmt: skip
    assert two.device.vector_flops == dev.vector_flops  # one core per rank
    # four ranks on two cores: half a core each, every rate halved, each kernel twice as long
    assert four.device.vector_flops == pytest.approx(dev.vector_flops / 2)
    assert four.device.offchip_bw == pytest.approx(dev.offchip_bw / 2)
    assert four.device.kernel_overhead_s == pytest.approx(2 * dev.kernel_overhead_s)
    assert (four.memory_bytes, four.intra_bw, four.inter_bw) == (4e9, 0.5e9, 0.5e9)
    assert cluster_mod.local_cluster(2, cores=2, link_gbps=None).intra_bw == (
        cluster_mod.LOCAL_LINK_GBPS * 1e9)  # fmt: skip
    assert parse_cluster("local:3").world == 3
    for bad in ("local:0", "local:", "local:x"):
        with pytest.raises(ConfigError):
            parse_cluster(bad)
    # the plan computes in fp32 on this CPU: memory and time follow, and offload is not offered
    fsdp = Layout(1, 1, 1, 2, 8, 1)
    p = predict_layout(TINY, fsdp, two, 64)
    bf16_mem = lay_mod.layout_memory(TINY, fsdp, 64, "bf16", "cuda")["activations"]
    assert p.memory["activations"] > bf16_mem
    assert not any(x.layout.offload for x in recommend(TINY, two, 16, 64, top=100))
    # every TP collective costs the latency; gloo on a CPU overlaps nothing with compute
    slow = cluster_mod.local_cluster(2, cores=2, latency_s=0.01)
    quick = cluster_mod.local_cluster(2, cores=2, latency_s=0.0)
    # 2 micro-batches × (4 layers × 12 collectives + the head's 2), and 4 all-reduces a step of
    # each of the 9 LayerNorms' 2 replicated parameters
    tp2 = Layout(2, 1, 1, 1, 8, 2)
    tp = lambda c: predict_layout(TINY, tp2, c, 64).parts["tp"]  # noqa: E731
    assert tp(slow) - tp(quick) == pytest.approx(0.01 * (2 * (4 * 12 + 2) + 4 * 9 * 2))
    n = lay_mod.stage_shape(TINY, 1).stage_params
    comm = (2 * 1 * 4 * n + 4 * n) / 2 / quick.intra_bw  # gathers fwd+bwd, one reduce-scatter
    assert predict_layout(TINY, fsdp, quick, 64).parts["dp"] == pytest.approx(comm)


def test_offload_only_when_memory_requires_it_or_it_wins():
    big = Shape(n_layers=8, d_model=1024, n_heads=8, d_ffn=4096, vocab_size=1000,
                max_seq_len=512, tie_embeddings=False)  # fmt: skip
    roomy = make_cluster("H100", 1, 8)
    for x in enumerate_layouts(big, 8, 64, offload=True):
        if x.offload:  # the same layout without offload is faster and holds more on the device
            twin = predict_layout(big, dataclasses.replace(x, offload=False), roomy, 512)
            p = predict_layout(big, x, roomy, 512)
            assert p.step_s > twin.step_s and p.memory["peak"] < twin.memory["peak"]
            assert p.parts["offload"] > 0 and p.memory["host"] > 0
    best = recommend(big, roomy, 64, 512, top=1)[0]
    assert not best.layout.offload
    # memory so tight that only offload layouts fit: one of them is recommended
    without = [predict_layout(big, x, roomy, 512) for x in enumerate_layouts(big, 8, 64)]
    lean = min(p.memory["peak"] for p in without)
    tight = make_cluster("H100", 1, 8, memory_gb=0.95 * lean / USABLE / 1e9)
    picks = recommend(big, tight, 64, 512, top=50)
    assert picks and all(p.layout.offload for p in picks)
    assert all(p.memory["host"] <= USABLE * tight.host_memory_bytes for p in picks)
    assert yaml.safe_load(parallel_yaml(picks[0].layout))["parallel"]["cpu_offload"] is True


def test_cost_is_hours_times_devices_times_price(capsys):
    c = make_cluster("H100", 2, 8)
    p = predict_layout(TINY, Layout(1, 1, 1, 16, 1, 1), c, 64, tokens=1e9)
    assert c.price_per_hour == pytest.approx(98.32 / 8)
    assert p.cost_usd == pytest.approx(p.train_s / 3600 * 16 * c.price_per_hour)
    assert predict_layout(TINY, Layout(1, 1, 1, 8, 1, 1), make_cluster("H200", 1, 8), 64,
                          tokens=1e9).cost_usd is None  # no public price: no cost  # fmt: skip
    argv = ["plan", "--preset", "cerebras-gpt-111m", "--cluster", "2x4xH100", "--top", "2",
            "--global-batch", "64", "--price", "2.5", "--json"]  # fmt: skip
    assert main(argv) == 0
    for x in json.loads(capsys.readouterr().out)["layouts"]:
        assert x["cost_usd"] == pytest.approx(x["train_s"] / 3600 * 8 * 2.5)
    assert main(argv[:-1]) == 0
    out = capsys.readouterr().out
    assert "cost $" in out and "$2.5/device-hour" in out


def test_cpu_offload_config_needs_sharded_fsdp():
    from kiln.config import JobConfig, ParallelConfig

    assert ParallelConfig(cpu_offload=True).cpu_offload
    job = JobConfig(parallel=ParallelConfig(data="ddp", cpu_offload=True))
    with pytest.raises(ConfigError, match="parallel.cpu_offload needs"):
        job.validate(2)
    JobConfig(parallel=ParallelConfig(cpu_offload=True)).validate(2)
