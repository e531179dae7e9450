"""Measured collective costs (kiln.planning.collectives) and how the layout planner charges
them: each kind from its own fit, the ring model where none was measured."""

from __future__ import annotations

import pytest

from kiln.planning import cluster as cluster_mod
from kiln.planning import collectives as coll
from kiln.planning.collectives import CollectiveFit
from kiln.planning.flops import Shape
from kiln.planning.hardware import Device
from kiln.planning.layout import Layout, predict_layout, stage_shape
from kiln.planning.ops import StepShape
from kiln.planning.perf import predict

TINY = Shape(n_layers=4, d_model=64, n_heads=4, d_ffn=96, vocab_size=128, max_seq_len=64,
             tie_embeddings=False)  # fmt: skip
FITS = (
    CollectiveFit("all_reduce", 2, 1e-3, 2e9),
    CollectiveFit("all_gather", 2, 2e-3, 1e9),
    CollectiveFit("reduce_scatter", 2, 3e-3, 0.5e9),
    CollectiveFit("send", 2, 4e-3, 4e9),
)


@pytest.fixture
def cpu2(monkeypatch):
    """local:2 on a fake calibrated CPU, with FITS as its measured collectives."""
    dev = Device("cpu", 1e9, 20e9, 10e9, None, None, "fake", 1.0, 5e9, 1e-5)
    monkeypatch.setattr(cluster_mod, "_one_thread_cpu", lambda cache_path: dev)
    monkeypatch.setattr(cluster_mod, "_host_memory", lambda: 16e9)
    monkeypatch.setattr(cluster_mod, "measure_collectives", lambda n, cache_path=None: FITS)
    return cluster_mod.local_cluster(2, cores=2, precision="fp32")


def test_each_kind_is_charged_from_its_own_fit(cpu2):
    assert cpu2.collectives == FITS and cpu2.precision == "fp32"
    assert cpu2.comm_s("reduce_scatter", 2, 1, 1e6, 3) == pytest.approx(3 * 3e-3 + 1e6 / 0.5e9)
    assert cpu2.comm_s("send", 4, 1, 4e6, 1) == pytest.approx(4e-3 + 1e-3)  # any group
    # a group size nobody measured falls back to the ring: (g-1)/g of the message + latency
    assert cpu2.comm_s("all_gather", 4, 1, 4e6, 2) == pytest.approx(
        0.75 * 4e6 / cpu2.intra_bw + 2 * cpu2.latency_s
    )
    n = stage_shape(TINY, 1).stage_params
    fsdp = predict_layout(TINY, Layout(1, 1, 1, 2, 4, 2), cpu2, 64)  # 2 micro-batches
    gathers = FITS[1].seconds(2 * 2 * 4 * n, 5 * 2 * 2)  # 4 blocks + root, fwd and bwd each
    assert fsdp.parts["dp"] == pytest.approx(gathers + FITS[2].seconds(4 * n, 5))
    act = 4 * 64 * 64 * 4  # one fp32 b·s·d activation
    sp = predict_layout(TINY, Layout(2, 1, 1, 1, 4, 2), cpu2, 64)
    # per kind, as kiln's TP plan issues them: per micro-batch and layer one for each of the
    # 4 column-parallel (q, k, v, up) and 2 row-parallel linears, and the head's one
    calls = 2 * (4 * (4 + 2) + 1)
    norms = 4 * 9 * 2  # 4 all-reduces a step of each LayerNorm's (4 × 2 + 1) scale and shift
    assert sp.parts["tp"] == pytest.approx(FITS[1].seconds(calls * act, calls)
                                           + FITS[2].seconds(calls * act, calls)
                                           + FITS[0].seconds(norms * 4 * 64, norms))  # fmt: skip
    pp_tp = predict_layout(TINY, Layout(2, 2, 1, 1, 4, 2), cpu2, 64)  # no SP under PP
    reduces = 2 * 2 * (4 + 2)  # micro-batches × stage layers × linears
    assert pp_tp.parts["tp"] == pytest.approx(FITS[0].seconds(reduces * act, reduces))
    ddp = predict_layout(TINY, Layout(1, 1, 2, 1, 4, 2, data="ddp"), cpu2, 64)
    assert ddp.parts["dp"] == pytest.approx(FITS[0].seconds(4 * n, 1))


def test_a_cpu_step_is_costed_kernel_by_kernel(cpu2):
    """kiln trains eagerly on a CPU: the compute is perf's KBK step, not the fused one."""
    p = predict_layout(TINY, Layout(1, 1, 1, 2, 4, 1), cpu2, 64)
    r = predict(TINY, StepShape(batch=4, seq_len=64, precision="fp32", optimizer=False),
                cpu2.device)  # fmt: skip
    assert r.step_time_kbk > r.step_time_fused
    assert p.parts["compute"] == pytest.approx(r.step_time_kbk)


@pytest.mark.timeout(120)
def test_measure_collectives_fits_and_caches(tmp_path, monkeypatch):
    """Two real gloo processes: every kind gets a positive fit, and the cache answers next."""
    fits = coll.measure_collectives(2, tmp_path / "hw.json", sizes=(2**12, 2**16))
    assert {f.kind for f in fits} == set(coll.KINDS) and {f.group for f in fits} == {2}
    assert all(f.bytes_per_s > 0 and f.latency_s >= 0 for f in fits)
    monkeypatch.setattr(coll, "_spawn", lambda *a: pytest.fail("measured again"))
    assert coll.measure_collectives(2, tmp_path / "hw.json") == fits
