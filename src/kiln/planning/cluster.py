"""Clusters the layout planner plans for: devices from the hardware table grouped into nodes,
with their memory, links, host memory (for CPU offload) and price — or this machine running N
processes (``local:N``). Pure arithmetic, except that ``local:N`` reads the calibrated CPU."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kiln.errors import ConfigError
from kiln.planning.collectives import CollectiveFit, measure_collectives
from kiln.planning.hardware import DEVICES, Device

MEMORY_GB = {"A100": 80, "H100": 80, "H200": 141, "MI300X": 192}
"""Default memory per device (GB, 1e9 bytes), from the datasheets cited in DEVICES; a
'-40GB'-style suffix on the device name overrides it."""
INTER_NODE_BW = {"A100": 25e9, "H100": 50e9, "H200": 50e9, "MI300X": 50e9}
"""Default inter-node bytes/s per device: one 200 Gb/s HDR InfiniBand NIC per A100 (DGX
A100), one 400 Gb/s NDR NIC per H100/H200 (DGX H100); 400 Gb/s assumed for MI300X."""
HOST_MEMORY_GB = {"A100": 128, "H100": 256, "H200": 256, "MI300X": 256}
"""Host memory per device (GB) for CPU offload: DGX A100 1 TB / 8 GPUs, DGX H100 and DGX H200
2 TB / 8 (NVIDIA DGX datasheets); 2 TB / 8 assumed for an MI300X platform."""
HOST_BW = {"A100": 51e9, "H100": 77e9, "H200": 77e9, "MI300X": 77e9}
"""Host DRAM bytes/s per device, for the optimizer step CPU offload runs on the host: DGX A100
2 × EPYC 7742 with 8 channels of DDR4-3200 (2 × 204.8 GB/s) / 8 GPUs; DGX H100/H200 2 × Xeon
8480C with 8 channels of DDR5-4800 (2 × 307 GB/s) / 8; the DGX H100 figure assumed for
MI300X."""


# -- the cluster ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """Devices, how they are grouped into nodes, and the links between them."""

    nodes: int
    """Number of nodes."""
    devices_per_node: int
    """Devices in one node (sharing its fast links)."""
    device: Device
    """Performance-model entry of the device (kiln.planning.hardware.DEVICES)."""
    memory_bytes: float
    """Memory per device."""
    intra_bw: float
    """Bytes/s one device sends to another in its node (half the total NVLink bandwidth)."""
    inter_bw: float
    """Bytes/s one device sends to a device in another node (its NIC)."""
    precision: str = "bf16"
    """What the run computes in: 'bf16' (autocast, fp32 masters) or 'fp32'."""
    memory_device: str = "cuda"
    """Device kind the memory estimate is for ('cuda' or 'cpu': kiln.train.memory)."""
    host_link_bw: float | None = None
    """Bytes/s between a device and host memory, one direction; None = no CPU offload."""
    host_memory_bytes: float | None = None
    """Host memory per device, which CPU offload fills."""
    host_bw: float | None = None
    """Host DRAM bytes/s per device: the optimizer step runs at this rate under offload."""
    price_per_hour: float | None = None
    """USD per device-hour (hardware table's on-demand price or --price); None = unknown."""
    latency_s: float = 0.0
    """Seconds every collective or send costs whatever its size (the α of the α-β model);
    measured for local:N, 0 for the datasheet clusters (no published number)."""
    collectives: tuple[CollectiveFit, ...] = ()
    """Measured cost of each collective kind per group size (local:N:
    :func:`kiln.planning.collectives.measure_collectives`); empty = the α-β ring model."""

    def link_bw(self, size: int, stride: int) -> float:
        """Bytes/s of the link a group of ``size`` ranks ``stride`` apart talks over: the
        node's if all its ranks sit in one node, else the NIC."""
        return self.intra_bw if size * stride <= self.devices_per_node else self.inter_bw

    def comm_s(self, kind: str, size: int, stride: int, nbytes: float, calls: float) -> float:
        """Seconds of ``calls`` collectives of ``kind`` (KINDS of kiln.planning.collectives)
        in a group of ``size`` ranks ``stride`` apart, moving ``nbytes`` messages in all (the
        all-reduced or sent tensors, the all-gathers' outputs, the reduce-scatters' inputs).
        A measured fit for the kind and group size (a send: any group) wins; else each call
        costs ``latency_s`` and the bytes go over the ring at link_bw: (g−1)/g of the message
        for a gather or scatter, 2(g−1)/g for an all-reduce, all of it for a send."""
        if size < 2 or not calls:
            return 0.0
        for f in self.collectives:
            if f.kind == kind and (f.group == size or kind == "send"):
                return f.seconds(nbytes, calls)
        ring = {"all_reduce": 2 * (size - 1) / size, "send": 1.0}.get(kind, (size - 1) / size)
        return ring * nbytes / self.link_bw(size, stride) + self.latency_s * calls

    @property
    def overlaps(self) -> bool:
        """Whether communication can hide behind compute, and kernels are fused (flash
        attention, fused MLP): not on a CPU, where gloo's collectives run on the cores that
        compute and kiln trains eagerly, kernel by kernel."""
        return self.memory_device != "cpu"

    @property
    def world(self) -> int:
        return self.nodes * self.devices_per_node

    def describe(self) -> str:
        price = f", ${self.price_per_hour:g}/device-hour" if self.price_per_hour else ""
        return (f"{self.nodes}×{self.devices_per_node}×{self.device.name} "
                f"({self.memory_bytes / 1e9:g} GB, {self.intra_bw / 1e9:g} GB/s in a node, "
                f"{self.inter_bw / 1e9:g} GB/s across{price})")  # fmt: skip


def _device(name: str) -> tuple[Device, float | None]:
    m = re.fullmatch(r"(.+?)(?:-(\d+)GB)?", name.strip(), re.IGNORECASE)
    base, gb = m.group(1), m.group(2)
    for key, dev in DEVICES.items():
        if key.lower() == base.lower().replace("-sxm", ""):
            if dev.peak_bf16 is None or dev.offchip_bw is None or key not in MEMORY_GB:
                break
            return dev, float(gb) * 1e9 if gb else None
    known = ", ".join(k for k in DEVICES if k in MEMORY_GB)
    raise ConfigError(f"device {name!r} cannot be planned for; use one of {known} (optionally "
                      "with a memory suffix such as A100-40GB).")  # fmt: skip


def make_cluster(
    device: str,
    nodes: int,
    devices_per_node: int,
    memory_gb: float | None = None,
    intra_gbps: float | None = None,
    inter_gbps: float | None = None,
    price_per_hour: float | None = None,
) -> Cluster:
    """A Cluster with defaults from the hardware table for whatever is not given."""
    dev, suffix_mem = _device(device)
    for name, v in (("nodes", nodes), ("devices_per_node", devices_per_node)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"cluster {name} is {v!r} but must be a positive integer.")
    mem = memory_gb * 1e9 if memory_gb else suffix_mem or MEMORY_GB[dev.name] * 1e9
    intra = intra_gbps * 1e9 if intra_gbps else dev.link_bw / 2
    inter = inter_gbps * 1e9 if inter_gbps else INTER_NODE_BW[dev.name]
    price = price_per_hour or dev.price_per_hour
    host = HOST_MEMORY_GB[dev.name] * 1e9
    return Cluster(nodes, devices_per_node, dev, mem, intra, inter, "bf16", "cuda",
                   dev.host_link_bw, host, HOST_BW[dev.name], price)  # fmt: skip


LOCAL_LINK_GBPS = 1.0
"""Default gloo bandwidth between two processes of one machine (GB/s): the 2-process 64 MB
all-reduce of benchmarks/planner_measured.py measured 0.24-1.5 GB/s on the 2-core dev VM,
depending on the load."""
LOCAL_LATENCY_S = 1e-3
"""Default seconds one gloo collective between processes of one machine costs whatever its
size: the 4-byte all-reduce of benchmarks/planner_measured.py (median) measured from 0.1 ms on
a quiet 2-core dev VM to tens of ms when its cores are oversubscribed (a rank waits for its
peer to be scheduled)."""


def local_cluster(
    processes: int,
    cores: int | None = None,
    link_gbps: float | None = None,
    memory_gb: float | None = None,
    cache_path: str | Path | None = None,
    latency_s: float | None = None,
    precision: str | None = None,
) -> Cluster:
    """This machine running ``processes`` ranks under torchrun (gloo), as a Cluster.

    The device is the calibrated CPU (:func:`kiln.planning.hardware.cpu_device`: measured
    matmul peaks, copy bandwidth and kernel overhead, cached) with one torch thread, as
    torchrun starts each rank (OMP_NUM_THREADS=1). ``processes`` ranks share ``cores`` cores,
    so a rank gets min(1, cores/processes) of one core: every measured rate is scaled by that
    share and the per-kernel overhead divided by it. Memory per rank is the machine's memory
    / processes; the link between ranks is gloo over loopback (``link_gbps``, default
    LOCAL_LINK_GBPS) with ``latency_s`` per collective (default LOCAL_LATENCY_S); unless
    either is given, each collective kind is costed from its own measurement on this machine
    (:func:`kiln.planning.collectives.measure_collectives`, cached). The precision is
    ``precision`` or else the faster of bf16 and fp32 matmuls, as train.precision 'auto' picks
    on a CPU.
    """
    import dataclasses

    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"local cluster of {processes!r} processes; use a positive integer.")
    cores = cores or os.cpu_count() or 1
    dev = _one_thread_cpu(str(cache_path) if cache_path else None)
    f = share = min(1.0, cores / processes)
    scaled = dataclasses.replace(
        dev, name="cpu", peak_bf16=dev.peak_bf16 * f, vector_flops=dev.vector_flops * f,
        offchip_bw=dev.offchip_bw * f, fresh_write_bw=(dev.fresh_write_bw or dev.offchip_bw) * f,
        kernel_overhead_s=dev.kernel_overhead_s / share,
        source=f"{dev.source}; one thread and {share:g} of a core per rank",
    )  # fmt: skip
    mem = memory_gb * 1e9 if memory_gb else _host_memory() / processes
    link = (link_gbps or LOCAL_LINK_GBPS) * 1e9
    if precision not in (None, "bf16", "fp32"):
        raise ConfigError(f"precision {precision!r} for a local cluster; use bf16 or fp32.")
    precision = precision or ("bf16" if dev.peak_bf16 > dev.vector_flops else "fp32")
    alpha = LOCAL_LATENCY_S if latency_s is None else latency_s
    measured = link_gbps is None and latency_s is None and processes > 1
    fits = measure_collectives(processes, cache_path) if measured else ()
    return Cluster(1, processes, scaled, mem, link, link, precision, "cpu", latency_s=alpha,
                   collectives=fits)  # fmt: skip


@lru_cache(maxsize=4)
def _one_thread_cpu(cache_path: str | None) -> Device:
    """The calibrated CPU with one torch thread, once per process (a calibration size picked
    under a passing load must not change between the layouts of one plan)."""
    import torch

    from kiln.planning.hardware import cpu_device

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cpu_device(cache_path)
    finally:
        torch.set_num_threads(threads)


def _host_memory() -> float:
    """Bytes of this machine's memory (MemTotal)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024.0
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_cluster(spec: str) -> Cluster:
    """``64xH100`` (8 per node), ``4x8xA100-80GB`` (nodes × per node), ``local:4`` (this
    machine with 4 processes: :func:`local_cluster`) or a YAML file with device, nodes,
    devices_per_node and optionally memory_gb, intra_node_gbps (GB/s), inter_node_gbps,
    price_per_hour (USD per device-hour)."""
    local = re.fullmatch(r"local:(\d+)", spec.strip())
    if local and int(local.group(1)) > 0:
        return local_cluster(int(local.group(1)))
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        import yaml

        try:
            d = yaml.safe_load(Path(spec).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cluster file {spec!r} cannot be read ({e}).") from None
        keys = {"device", "nodes", "devices_per_node", "memory_gb", "intra_node_gbps",
                "inter_node_gbps", "price_per_hour"}  # fmt: skip
        if not isinstance(d, dict) or "device" not in d or set(d) - keys:
            raise ConfigError(f"cluster file {spec!r} must be a mapping with device and "
                              f"optionally {', '.join(sorted(keys - {'device'}))}.")  # fmt: skip
        return make_cluster(d["device"], d.get("nodes", 1), d.get("devices_per_node", 8),
                            d.get("memory_gb"), d.get("intra_node_gbps"),
                            d.get("inter_node_gbps"), d.get("price_per_hour"))  # fmt: skip
    m = re.fullmatch(r"(\d+)x(?:(\d+)x)?(.+)", spec.strip())
    if m and int(m.group(1)) > 0 and (m.group(2) is None or int(m.group(2)) > 0):
        if m.group(2):
            return make_cluster(m.group(3), int(m.group(1)), int(m.group(2)))
        n = int(m.group(1))
        per = min(n, 8)
        if n % per:
            raise ConfigError(f"cluster {spec!r}: {n} devices do not fill nodes of 8; write "
                              "NODESxPERxDEVICE (e.g. 2x4xH100).")  # fmt: skip
        return make_cluster(m.group(3), n // per, per)
    raise ConfigError(f"cluster {spec!r} is not COUNTxDEVICE (64xH100), NODESxPERxDEVICE "
                      "(4x8xA100-80GB), local:PROCESSES or a YAML file.")  # fmt: skip
