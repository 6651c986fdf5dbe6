"""The performance model: a data-parallel step, compute then the communication DDP cannot hide
behind backward, with the communication costs behind one interface (CollectiveCost.time(op,
size)): CommModel, fitted to the collectives dltrain.bench.comm times on this host, and NcclModel,
NCCL on GPU links for the projection. dltrain.bench.scaling checks the model against measured runs
and projects it.

    step(N) = step(1) + exposed gradient all-reduce + buffer broadcast + dltrain's own collectives

step(1) is the step measured at world size 1 (forward + backward + optimizer + everything else the
loop does). DDP all-reduces gradients in buckets: torch's own assignment
(`torch.distributed._compute_bucket_assignment_by_size`) over the parameters in the order their
gradients became ready, which is how DDP rebuilds its buckets after the first step; the caps are
DDP's: a first bucket of 1 MiB then 25 MiB when no bucket_cap_mb is given (Accelerate passes none
when it is its default, 25), else bucket_cap_mb for every bucket (torch's _BucketCapacityConfig).
A bucket's all-reduce starts when its last gradient is ready and the previous bucket's has
finished (one communication stream), and takes alpha + 2(N-1)/N x bytes / busbw (the fits below).
Whatever runs past the end of backward is exposed: the last buckets (often the embeddings, ready
last) cannot overlap anything.

Per step, dltrain itself all-reduces one scalar when N > 1 (the sum of the losses, so that every
rank takes the same decision on a non-finite loss); DDP broadcasts the module's buffers from rank 0
before each forward when the model has any. Both are charged in full.

When gradients become ready comes from dltrain.bench.measure.profile_step: a hook on each
parameter times the moment its gradient is accumulated, relative to the start of backward.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable


class StepTimes(Protocol):
    """What slowest_of reads of a config's results (dltrain.bench.result.Config has it): the model
    stays below the result types, which import its Fit."""

    step_time_ms_percentiles: list[float] | None

    def mean(self, key: str) -> float: ...


@runtime_checkable
class CollectiveCost(Protocol):
    """What the step model asks of a communication cost model: seconds for one collective `op`
    ("all_reduce", "broadcast" ...) of `size` bytes over `world_size` ranks. CommModel (fitted to
    collectives measured on this host) and NcclModel (NCCL on GPU links) are the two."""

    world_size: int

    def time(self, op: str, size: int) -> float: ...


FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DEFAULT_BUCKET_CAP_MB = 25
LOSS_REDUCE_BYTES = 4  # the float32 loss sum dltrain all-reduces once per step


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    ready_s: float  # into backward, when its last gradient is ready


def ddp_buckets(grads: list[tuple[int, float]], bucket_cap_mb: float | None = None) -> list[Bucket]:
    """Buckets as DDP forms them from (bytes, ready seconds) per float32 gradient; `grads` in any
    order (they are sorted by readiness, the order DDP rebuilds its buckets in). bucket_cap_mb:
    None (or 25) for DDP's default."""
    import torch
    import torch.distributed as dist

    default = bucket_cap_mb is None or bucket_cap_mb == DEFAULT_BUCKET_CAP_MB
    cap = int((bucket_cap_mb or DEFAULT_BUCKET_CAP_MB) * 2**20)
    order = sorted(grads, key=lambda g: g[1])
    tensors = [torch.empty(max(1, nbytes // 4), device="meta") for nbytes, _ in order]
    groups, _ = dist._compute_bucket_assignment_by_size(
        tensors, [FIRST_BUCKET_BYTES if default else cap, cap], [False] * len(tensors)
    )
    buckets = [Bucket(sum(order[i][0] for i in g), max(order[i][1] for i in g)) for g in groups]
    return sorted(buckets, key=lambda b: b.ready_s)


def overlap(buckets: list[Bucket], backward_s: float, cost) -> dict:
    """Serial communication of the buckets from their ready times; `cost(bytes)` in seconds.
    Returns the total communication time, when it ends and what of it is exposed past backward."""
    end, total = 0.0, 0.0
    for b in buckets:
        t = cost(b.nbytes)
        end = max(end, b.ready_s) + t
        total += t
    return {"comm_s": total, "comm_end_s": end, "exposed_s": max(0.0, end - backward_s)}


def predict_step(step1_s: float, profile: dict, comm: CollectiveCost, bucket_cap_mb: float | None = None) -> dict:
    """The step time at comm.world_size from the world-size-1 step and the profile of one step
    (backward_s, grads [(bytes, ready_s)], buffer_bytes); `comm` a CollectiveCost (CommModel, NcclModel)."""
    if comm.world_size == 1:
        return {"step_s": step1_s, "exposed_s": 0.0, "comm_s": 0.0, "buffers_s": 0.0, "own_s": 0.0, "buckets": 0}
    buckets = ddp_buckets([tuple(g) for g in profile["grads"]], bucket_cap_mb)
    ov = overlap(buckets, profile["backward_s"], lambda nbytes: comm.time("all_reduce", nbytes))
    buffers = comm.time("broadcast", profile["buffer_bytes"]) if profile.get("buffer_bytes") else 0.0
    own = comm.time("all_reduce", LOSS_REDUCE_BYTES)
    return {
        "step_s": step1_s + ov["exposed_s"] + buffers + own,
        "exposed_s": ov["exposed_s"],
        "comm_s": ov["comm_s"],
        "buffers_s": buffers,
        "own_s": own,
        "buckets": len(buckets),
    }


def slowest_of(cfg: StepTimes, n: int) -> float:
    """Seconds: the median over steps of the slowest of n ranks' step times, each rank drawing its
    batch independently from the world-1 step-time distribution: its 0.5^(1/n) quantile (p50 for
    n = 1, p70.7 for n = 2, p99 and beyond for n >= 69, clamped to the p99 recorded). Text with
    dynamic padding varies step to step; a synchronous step waits for the longest batch."""
    pct = cfg.step_time_ms_percentiles
    if not pct:
        return cfg.mean("step_time_ms_p50") / 1e3
    q = min(99.0, max(1.0, 100 * 0.5 ** (1 / n)))
    lo = int(q)
    frac = q - lo
    at = lambda k: pct[min(max(k, 1), 99) - 1]  # noqa: E731  pct[k-1] is the k-th percentile
    return (at(lo) + frac * (at(lo + 1) - at(lo))) / 1e3


# ----------------------------------------------------------------------------------------------
# Communication on this host: the alpha-beta fits of collectives timed by dltrain.bench.comm

KiB, MiB = 2**10, 2**20
# Inclusive at both ends, so neighbouring fits share a point and each has at least five.
SIZE_RANGES = {"small": (4 * KiB, 64 * KiB), "medium": (64 * KiB, 4 * MiB), "large": (4 * MiB, 2**40)}


def bus_factor(op: str, world: int) -> float:
    """busbw / algbw for `op` over `world` ranks (nccl-tests' definitions)."""
    if world == 1:
        return 0.0
    return {
        "all_reduce": 2 * (world - 1) / world,
        "all_gather": (world - 1) / world,
        "reduce_scatter": (world - 1) / world,
        "broadcast": 1.0,
    }[op]


@dataclass(frozen=True)
class Fit:
    op: str
    world_size: int
    range: str
    lo: int
    hi: int
    alpha_s: float  # latency
    busbw: float  # bytes/s each link carries
    max_rel_err: float  # the fit's worst miss over the points it was fitted to
    points: int

    def time(self, size: float) -> float:
        return self.alpha_s + bus_factor(self.op, self.world_size) * size / self.busbw


def _fit_relative(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """(alpha, slope) of t = alpha + slope x minimizing the squared relative misses (t - fit) / t:
    ordinary least squares would fit the largest times and leave the small ones 100% off."""
    w = [1 / t**2 for _, t in pts]
    sw, sx, st = sum(w), sum(wi * x for wi, (x, _) in zip(w, pts)), sum(wi * t for wi, (_, t) in zip(w, pts))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, pts))
    sxt = sum(wi * x * t for wi, (x, t) in zip(w, pts))
    det = sw * sxx - sx * sx
    if det <= 0:
        return st / sw, 0.0
    return (sxx * st - sx * sxt) / det, (sw * sxt - sx * st) / det


def fit_alpha_beta(rows: list[dict]) -> list[Fit]:
    """alpha and busbw per (op, world size, size range), fitted to relative error."""
    fits = []
    for op, world in sorted({(r["op"], r["world_size"]) for r in rows}):
        factor = bus_factor(op, world)
        for name, (lo, hi) in SIZE_RANGES.items():
            pts = [
                (factor * r["bytes"], r["time_us"] / 1e6)
                for r in rows
                if r["op"] == op and r["world_size"] == world and lo <= r["bytes"] <= hi
            ]
            if len(pts) < 2 or factor == 0:
                continue
            alpha, slope = _fit_relative(pts)
            if slope <= 0:  # flat (all latency): more bandwidth than these sizes can show
                alpha, slope = statistics.median(t for _, t in pts), 1e-15
            elif alpha < 0:  # a line through the origin: no latency visible at these sizes
                alpha, slope = 0.0, statistics.median(t / x for x, t in pts)
            fit = Fit(op, world, name, lo, hi, alpha, 1 / slope, 0.0, len(pts))
            worst = max(abs(fit.time(x / factor) / t - 1) for x, t in pts)
            fits.append(replace(fit, max_rel_err=worst))
    return fits


class CommModel:
    """Time of one collective of `size` bytes from the fits: the fit of the range holding the
    size (below the smallest range: the small-message fit; above: the large one)."""

    def __init__(self, fits: list[Fit], world_size: int):
        self.world_size = world_size
        self.fits = {}
        for f in fits:
            if f.world_size == world_size:
                self.fits.setdefault(f.op, []).append(f)
        for ranges in self.fits.values():
            ranges.sort(key=lambda f: f.lo)

    def time(self, op: str, size: int) -> float:
        if self.world_size == 1 or size <= 0:
            return 0.0
        ranges = self.fits.get(op)
        if not ranges:
            raise KeyError(f"no {op} fit at world size {self.world_size}")
        fit = next((f for f in ranges if size <= f.hi), ranges[-1])
        return max(0.0, fit.time(size))


def load_fits(path: Path) -> list[Fit]:
    return [Fit(**f) for f in json.loads(path.read_text())["fits"]]


# ----------------------------------------------------------------------------------------------
# Communication on GPU nodes: NCCL

GPUS_PER_NODE = 8


class NcclModel:
    """NCCL collective times on GPU nodes: the faster of a ring and a tree, LL (small messages) or
    Simple (large) protocol, as NCCL's own tuner picks (src/graph/tuning.cc, NCCL 2.x: base and
    per-hop latencies in microseconds, LL at 1/4 of the bus bandwidth on a ring, 1/3.8 on a tree;
    a tree's algorithm bandwidth half the bus bandwidth). Bus bandwidths:

    * in a node: NVLink 4 through NVSwitch, 450 GB/s per GPU per direction (H100 SXM datasheet,
      900 GB/s bidirectional); nccl-tests all-reduce on 8 H100 SXM reports 460-480 GB/s with NVLS.
    * across nodes: one NDR InfiniBand NIC per GPU, 400 Gb/s = 50 GB/s each; NCCL runs a ring per
      NIC, so a node's 8 NICs give the ring 8 x 50 GB/s, at an assumed 90% efficiency: 360 GB/s.
    """

    BASE = {("ring", "LL"): 3.6, ("ring", "Simple"): 8.4, ("tree", "LL"): 4.4, ("tree", "Simple"): 0.0}
    HOP = {
        "nvlink": {("ring", "LL"): 0.47, ("ring", "Simple"): 3.4, ("tree", "LL"): 0.52, ("tree", "Simple"): 28.0},
        "net": {("ring", "LL"): 2.7, ("ring", "Simple"): 9.6, ("tree", "LL"): 5.0, ("tree", "Simple"): 50.0},
    }
    NVLINK_BUSBW = 450e9
    NIC_BW, NICS_PER_NODE, NET_EFFICIENCY = 50e9, 8, 0.9

    def __init__(self, world_size: int, gpus_per_node: int = GPUS_PER_NODE):
        self.world_size = world_size
        self.ppn = min(world_size, gpus_per_node)
        self.nodes = math.ceil(world_size / gpus_per_node)
        inter = self.NICS_PER_NODE * self.NIC_BW * self.NET_EFFICIENCY
        self.busbw = self.NVLINK_BUSBW if self.nodes == 1 else min(self.NVLINK_BUSBW, inter)
        self.link = (
            "NVLink 4 / NVSwitch, 450 GB/s busbw"
            if self.nodes == 1
            else f"{self.nodes} nodes: NDR IB, 8 x 50 GB/s NICs x 0.9 = {self.busbw / 1e9:.0f} GB/s busbw"
        )

    def latency_s(self, algo: str, proto: str, op: str = "all_reduce") -> float:
        n, nodes, intra, net = self.world_size, self.nodes, self.HOP["nvlink"], self.HOP["net"]
        key = (algo, proto)
        if algo == "ring":
            steps, inter = (2 * (n - 1), 2 * (nodes - 1)) if op == "all_reduce" else (n - 1, nodes - 1)
            lat = self.BASE[key] + (steps - inter) * intra[key] + inter * net[key]
        else:
            lat = self.BASE[key] + 2 * ((self.ppn - 1) * intra[key] + math.log2(nodes) * net[key])
        return lat * 1e-6

    def time(self, op: str, size: int) -> float:
        n = self.world_size
        if n == 1 or size <= 0:
            return 0.0
        ring_factor = 2 * (n - 1) / n if op == "all_reduce" else 1.0
        options = [
            self.latency_s("ring", p, op) + ring_factor * size / (self.busbw * s)
            for p, s in (("LL", 0.25), ("Simple", 1.0))
        ]
        if op == "all_reduce":  # trees are for all-reduce only
            options += [
                self.latency_s("tree", p) + 2 * size / (self.busbw * s) for p, s in (("LL", 1 / 3.8), ("Simple", 0.9))
            ]
        return min(options)
