"""The communication fit, the step model and the GPU link model: textbook cases, and DDP's own buckets."""

from __future__ import annotations

import json
import random
import tempfile

import pytest
import torch

from dltrain.bench.comm import parse_size, sizes_between
from dltrain.bench.perfmodel import (
    LOSS_REDUCE_BYTES,
    Bucket,
    CollectiveCost,
    CommModel,
    Fit,
    NcclModel,
    bus_factor,
    ddp_buckets,
    fit_alpha_beta,
    overlap,
    predict_step,
    slowest_of,
)
from dltrain.bench.result import Config, Stats, ValidationRow
from dltrain.bench.scaling import projection, read_gpu_configs, refused_projections
from dltrain.recipe import RecipeError


def one_fit(world: int, alpha: float, busbw: float, op: str = "all_reduce") -> Fit:
    return Fit(op, world, "all", 0, 2**40, alpha, busbw, 0.0, 2)


def test_bus_bandwidth_factors_are_those_of_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 4) == bus_factor("reduce_scatter", 4) == pytest.approx(3 / 4)
    assert bus_factor("broadcast", 16) == 1.0 and bus_factor("all_reduce", 1) == 0.0


def test_the_fit_recovers_alpha_and_bandwidth_from_synthetic_timings():
    rng = random.Random(0)
    alpha, busbw, world = 50e-6, 2e9, 2
    rows = [
        {
            "op": "all_reduce",
            "world_size": world,
            "bytes": n,
            "time_us": (alpha + bus_factor("all_reduce", world) * n / busbw) * 1e6 * (1 + rng.uniform(-0.02, 0.02)),
        }
        for n in sizes_between(4096, 512 * 2**20)
    ]
    fits = fit_alpha_beta(rows)
    assert {f.range for f in fits} == {"small", "medium", "large"}
    small = next(f for f in fits if f.range == "small")
    large = next(f for f in fits if f.range == "large")
    assert small.alpha_s == pytest.approx(alpha, rel=0.05)  # latency-bound sizes pin the latency
    assert large.busbw == pytest.approx(busbw, rel=0.05)  # bandwidth-bound sizes pin the bandwidth
    assert all(f.max_rel_err < 0.05 for f in fits)


def test_sizes_and_their_spelling():
    assert sizes_between(4096, 65536) == [4096, 8192, 16384, 32768, 65536]
    assert parse_size("4K") == 4096 and parse_size("512M") == 512 * 2**20 and parse_size("1GiB") == 2**30
    with pytest.raises(RecipeError, match="give bytes or a number with K, M or G"):
        parse_size("lots")


def test_one_bucket_ready_at_the_end_of_backward_is_the_closed_form():
    """No overlap possible: step(N) = step(1) + alpha + 2(N-1)/N x bytes / busbw (+ the loss all-reduce)."""
    alpha, busbw, n, nbytes, step1 = 100e-6, 1e9, 4, 8 * 2**20, 0.050
    profile = {"backward_s": 0.02, "grads": [(nbytes, 0.02)], "buffer_bytes": 0}
    pred = predict_step(step1, profile, CommModel([one_fit(n, alpha, busbw)], n), bucket_cap_mb=25)
    closed = step1 + alpha + 2 * (n - 1) / n * nbytes / busbw
    loss_reduce = alpha + 2 * (n - 1) / n * LOSS_REDUCE_BYTES / busbw
    assert pred["buckets"] == 1
    assert pred["step_s"] == pytest.approx(closed + loss_reduce, rel=1e-9)


def test_infinite_bandwidth_and_no_latency_leave_the_compute_time():
    profile = {"backward_s": 0.02, "grads": [(4 * 2**20, 0.005), (30 * 2**20, 0.02)], "buffer_bytes": 4096}
    comm = CommModel([one_fit(8, 0.0, float("inf")), one_fit(8, 0.0, float("inf"), "broadcast")], 8)
    assert predict_step(0.05, profile, comm)["step_s"] == pytest.approx(0.05)


def test_world_size_one_has_no_communication():
    profile = {"backward_s": 0.02, "grads": [(10**8, 0.02)], "buffer_bytes": 0}
    pred = predict_step(0.05, profile, CommModel([], 1))
    assert pred["step_s"] == 0.05 and pred["comm_s"] == 0.0
    assert NcclModel(1).time("all_reduce", 10**9) == 0.0


def test_both_communication_models_answer_the_step_models_one_question():
    """The step model takes either cost model: the fits of this host's collectives or NCCL's links."""
    fitted, nccl = CommModel([one_fit(8, 1e-5, 1e9)], 8), NcclModel(8)
    for model in (fitted, nccl):
        assert isinstance(model, CollectiveCost) and model.world_size == 8
        assert 0 < model.time("all_reduce", 2**20) < model.time("all_reduce", 2**26)
    profile = {"backward_s": 0.01, "grads": [(2**20, 0.01)], "buffer_bytes": 0}
    assert predict_step(0.05, profile, fitted)["step_s"] > predict_step(0.05, profile, nccl)["step_s"] > 0.05


def test_early_buckets_hide_behind_backward_and_late_ones_do_not():
    cost = lambda nbytes: nbytes / 1e9  # noqa: E731  1 GB/s, no latency
    early = [Bucket(10**6, 0.001), Bucket(10**6, 0.003)]  # 1 ms each, done by 4 ms
    assert overlap(early, backward_s=0.010, cost=cost)["exposed_s"] == 0.0
    late = early + [Bucket(5 * 10**6, 0.010)]  # ready when backward ends: all 5 ms exposed
    assert overlap(late, backward_s=0.010, cost=cost)["exposed_s"] == pytest.approx(0.005)
    queued = [Bucket(8 * 10**6, 0.001), Bucket(10**6, 0.002)]  # the second waits for the first (one stream)
    assert overlap(queued, backward_s=0.005, cost=cost)["comm_end_s"] == pytest.approx(0.010)


def test_buckets_are_ddps_own_after_it_rebuilds_them():
    """The model's assignment against DDP's rebuilt buckets on a real DistributedDataParallel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    layers = [torch.nn.Linear(10, 512)] + [torch.nn.Linear(512, 512) for _ in range(5)] + [torch.nn.Linear(512, 4)]
    model = torch.nn.Sequential(*layers)  # 1 MiB weights: several buckets at a 2 MB cap
    ready, order = {}, []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: order.append(name))
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            ddp = DistributedDataParallel(model, bucket_cap_mb=2)
            for _ in range(3):
                order.clear()
                ddp(torch.randn(2, 10)).sum().backward()
            theirs = [int(x) for x in ddp._get_ddp_logging_data()["rebuilt_bucket_sizes"].split(",")]
        finally:
            dist.destroy_process_group()
    params = dict(model.named_parameters())
    ready = [(params[n].numel() * 4, i) for i, n in enumerate(order)]
    ours = ddp_buckets(ready, bucket_cap_mb=2)
    assert [b.nbytes for b in ours] == theirs and len(theirs) > 2


def test_ddps_default_caps_start_with_a_small_first_bucket():
    """A bucket closes once it reaches its cap; gradients are never split."""
    mib = 2**20
    grads = [(mib // 4, 0.001)] * 8 + [(20 * mib, 0.002), (20 * mib, 0.003)]  # eight 256 KiB, two 20 MiB
    assert [b.nbytes for b in ddp_buckets(grads)] == [mib, 41 * mib]  # 1 MiB first, then up to 25 MiB
    assert [b.nbytes for b in ddp_buckets(grads, bucket_cap_mb=25)] == [mib, 41 * mib]  # what Accelerate passes as none
    assert [b.nbytes for b in ddp_buckets(grads, bucket_cap_mb=4)] == [22 * mib, 20 * mib]  # the cap for every bucket


def test_nccl_model_latency_grows_with_the_ring_and_bandwidth_bounds_large_messages():
    small = [NcclModel(n).time("all_reduce", 4096) for n in (8, 64, 1024)]
    assert small[0] < small[1] < small[2]
    big = 2**30
    for n, within in ((8, 1.2), (1024, 1.5)):  # at 1024 a tree (0.9 of busbw, 2 x bytes) beats a 2,046-hop ring
        m = NcclModel(n)
        floor = 2 * (n - 1) / n * big / m.busbw
        assert floor < m.time("all_reduce", big) < within * floor
    assert NcclModel(8).busbw == 450e9 and NcclModel(16).busbw == pytest.approx(360e9)


def test_the_projection_is_labelled_and_never_uses_cpu_compute(tmp_path):
    profile = {
        "forward_s": 0.01,
        "backward_s": 0.02,
        "optimizer_s": 0.002,
        "buffer_bytes": 0,
        "grads": [(4 * 2**20, 0.001), (90 * 2**20, 0.02)],
        "bucket_cap_mb": 25.0,
    }
    flops = {"bert": {"flops_per_sample_measured": 3e9, "micro_batch": 32, "step_profile": profile}}
    rows = projection(flops)
    assert [r.world_size for r in rows] == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert all(r.label == "PROJECTED" and "assumed MFU" in r.compute_source for r in rows)
    assert rows[0].compute_ms == pytest.approx(3e9 * 32 / (989e12 * 0.4) * 1e3)
    assert all(0 < r.efficiency <= 1 for r in rows)
    # A workload whose step-model check missed on this host is not projected at all.
    misses = (("bert", -0.25), ("cnn", 0.02))
    checks = [ValidationRow.model_construct(entry=e, world_size=2, error=err) for e, err in misses]
    refused = refused_projections(checks)
    assert list(refused) == ["bert"] and "missed its measured 2-process step by -25%" in refused["bert"]
    assert projection(flops, refused=refused) == []
    (tmp_path / "summary.json").write_text(json.dumps({"environment": {"device": "cpu"}, "configs": {}}))
    with pytest.raises(RecipeError, match="projecting CPU compute onto GPU links is refused"):
        read_gpu_configs(tmp_path)


def test_small_collectives_are_timed_back_to_back_between_marks(tmp_path, monkeypatch):
    """On a GPU, an event before each single call puts that call's host overhead into a small
    message's time; calls run in groups between two marks instead (nccl-tests' way), each sample a
    group's time over its calls. (A CPU's synchronous gloo calls are bracketed one by one.)"""
    import torch
    import torch.distributed as dist

    from dltrain.bench import comm

    timeline: list[str] = []
    clock = iter(range(0, 10**6, 10))  # each mark 10 s after the previous: a group's samples are 10 s / group

    def mark(cuda):
        timeline.append("mark")
        return float(next(clock))

    monkeypatch.setattr(comm, "_mark", mark)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        median, mean, calls = comm.time_op(
            lambda: timeline.append("call"),
            torch.device("cpu"),
            target_s=1.0,
            group=comm.group_for(torch.device("cuda")),
        )
    finally:
        dist.destroy_process_group()
    groups = "".join("|" if t == "mark" else "c" for t in timeline).split("|")[1:-1]  # after the untimed warm-up calls
    assert len(groups) >= comm.MIN_GROUPS and set(groups) == {
        "c" * comm.GROUP
    }  # only calls between marks, GROUP of them
    assert calls == len(groups) * comm.GROUP and median == mean == pytest.approx(10 / comm.GROUP)
    assert comm.GROUP >= 10 and comm.group_for(torch.device("cpu")) == 1


PROFILE = {
    "forward_s": 0.01,
    "backward_s": 0.02,
    "optimizer_s": 0.002,
    "buffer_bytes": 0,
    "grads": [(4 * 2**20, 0.001), (90 * 2**20, 0.02)],
    "bucket_cap_mb": 25.0,
}


def _gpu_row(shape: dict, precision: str = "bf16", entry: str = "cnn") -> Config:
    return Config(
        entry=entry,
        kind="dltrain",
        mode="throughput",
        world_size=1,
        nnodes=1,
        precision=precision,
        compile=shape["compile"]["enabled"],
        shape=shape,
        figures={"step_time_ms_p50": Stats.of([2.0]), "samples_per_s": Stats.of([128_000.0])},
    )


def test_a_gpu_run_lends_its_step_time_only_to_an_entry_with_the_same_configuration():
    from dltrain.bench.scaling import compute_refusals

    shape = {"workload": "cnn", "micro_batch": 256, "compile": {"enabled": False}, "model": {"width": 32}}
    flops = {"cnn": {"flops_per_sample_measured": 1e9, "micro_batch": 256, "step_profile": PROFILE, "shape": shape}}
    # gpu_single's cnn: the same entry name, but compiled and at batch 64: another step
    other = shape | {"micro_batch": 64, "compile": {"enabled": True}}
    gpu = {"cnn-w1-bf16-tput": _gpu_row(other)}
    assert projection(flops, gpu) == []
    why = compute_refusals(flops, gpu)["cnn"]
    assert "micro_batch 64 vs 256" in why and "compile" in why and why.endswith("not projected")
    # a run of the same configuration, whatever its entry name, is used
    gpu["cnn_eager-w1-bf16-tput"] = _gpu_row(shape, entry="cnn_eager")
    rows = projection(flops, gpu)
    assert rows and all(r.compute_source == "measured on a GPU (cnn_eager-w1-bf16-tput)" for r in rows)
    assert compute_refusals(flops, gpu) == {}


def test_a_datasheet_step_below_the_launch_floor_is_refused_with_its_reason():
    from dltrain.bench.scaling import LAUNCH_FLOOR_S, compute_refusals

    batch = 64
    tiny = LAUNCH_FLOOR_S / 2 * 989e12 * 0.4 / batch  # FLOPs per sample of a step at half the floor
    flops = {"mlp": {"flops_per_sample_measured": tiny, "micro_batch": batch, "step_profile": PROFILE}}
    assert projection(flops) == []
    assert "below the 100 µs launch floor" in compute_refusals(flops, None)["mlp"]
    flops["mlp"]["flops_per_sample_measured"] = tiny * 4  # twice the floor: projected from the datasheet
    assert projection(flops) and compute_refusals(flops, None) == {}


def test_the_slowest_of_n_ranks_is_the_half_to_the_one_over_n_quantile():
    def config(p50: float, percentiles: list[float] | None = None) -> Config:
        return Config(
            kind="dltrain",
            entry="x",
            mode="throughput",
            world_size=1,
            precision="fp32",
            figures={"step_time_ms_p50": Stats.of([p50])},
            step_time_ms_percentiles=percentiles,
        )

    cfg = config(50.0, [float(k) for k in range(1, 100)])  # the k-th percentile is k ms
    assert slowest_of(cfg, 1) == pytest.approx(0.050)
    assert slowest_of(cfg, 2) == pytest.approx(100 * 0.5**0.5 / 1e3)  # p70.7: P(both below) = 0.5
    assert slowest_of(cfg, 1024) == pytest.approx(0.099)  # beyond the recorded p99: clamped
    assert slowest_of(config(20.0), 8) == pytest.approx(0.020)  # no distribution
