"""Scaling: measured efficiency, the step model checked against measured runs, and GPU projections.

* `scaling`: throughput(N) / (N x throughput(1)) at constant per-device batch, measured.
* `validation`: the world-N step time predicted by dltrain.bench.perfmodel from the world-1 run,
  the harness's step profile and the collectives measured on this host (dltrain.bench.comm), beside
  the measured world-N run. This is the check on the model: a projection is only as good as it.
* `projection`: 8..1024 GPUs, PROJECTED. Compute comes from a GPU: a gpu_single results directory
  (`--gpu-results`) run of the same configuration, or, when none is given, FLOPs / (datasheet
  peak x an assumed MFU) above a launch floor, each row saying which; otherwise the entry is
  refused with its reason (`compute_refusals`). Compute measured on a CPU is never put on GPU
  links. Links: `perfmodel.NcclModel`.
"""

from __future__ import annotations

from pathlib import Path

from dltrain.bench.perfmodel import CommModel, Fit, NcclModel, predict_step, slowest_of
from dltrain.bench.result import Config, ProjectionRow, ScalingRow, ValidationRow, read_summary

PROJECTED_WORLDS = [8, 16, 32, 64, 128, 256, 512, 1024]
ASSUMED_MFU = 0.40  # datasheet path only: a well-tuned dense transformer step; small models reach far less
GPU = "H100 SXM"
GPU_PEAK_BF16 = 989e12  # dense BF16, NVIDIA H100 datasheet (dltrain.peaks)


def _throughput_groups(configs: dict[str, Config]) -> dict[tuple, list[tuple[str, Config]]]:
    """dltrain throughput configs by (entry, precision, DeepSpeed stage, compile): (name, config) pairs."""
    groups: dict[tuple, list[tuple[str, Config]]] = {}
    for name, cfg in configs.items():
        if cfg.kind == "dltrain" and cfg.mode == "throughput" and cfg.mean("samples_per_s"):
            groups.setdefault((cfg.entry, cfg.precision, cfg.deepspeed_stage, cfg.compile), []).append((name, cfg))
    return groups


def scaling(configs: dict[str, Config]) -> list[ScalingRow]:
    rows = []
    for key, cfgs in _throughput_groups(configs).items():
        base = next((c for _, c in cfgs if c.world_size == 1), None)
        if base is None or len(cfgs) < 2:
            continue
        t1 = base.mean("samples_per_s")
        for name, c in sorted(cfgs, key=lambda nc: (nc[1].world_size, nc[1].nnodes)):
            speedup = c.mean("samples_per_s") / t1
            rows.append(
                ScalingRow(
                    entry=key[0],
                    precision=key[1],
                    deepspeed_stage=key[2],
                    compile=key[3],
                    config=name,
                    world_size=c.world_size,
                    nnodes=c.nnodes,
                    samples_per_s=c.mean("samples_per_s"),
                    speedup=speedup,
                    efficiency=speedup / c.world_size,
                )
            )
    return rows


def validation(configs: dict[str, Config], flops: dict[str, dict], fits: list[Fit]) -> list[ValidationRow]:
    """Predicted vs measured step time at each measured world size N > 1 on one node (plain DDP)."""
    rows = []
    for (entry, precision, stage, compiled), cfgs in _throughput_groups(configs).items():
        profile = (flops.get(entry) or {}).get("step_profile")
        base = next((c for _, c in cfgs if c.world_size == 1), None)
        if stage is not None or profile is None or base is None:
            continue
        for name, c in cfgs:
            n = c.world_size
            if n == 1 or c.nnodes != 1 or not any(f.world_size == n for f in fits):
                continue
            slowest = slowest_of(base, n)  # the median step of n ranks waits for the slowest
            shared = (profile.get("colocated") or {}).get(str(n), 1.0)  # n ranks on this host's cores
            step1 = slowest * shared
            pred = predict_step(step1, profile, CommModel(fits, n), profile.get("bucket_cap_mb"))
            measured = c.mean("step_time_ms_p50") / 1e3
            rows.append(
                ValidationRow(
                    entry=entry,
                    precision=precision,
                    compile=compiled,
                    config=name,
                    world_size=n,
                    world1_p50_ms=base.mean("step_time_ms_p50"),
                    slowest_of_n_ms=slowest * 1e3,
                    colocated_factor=shared,
                    step1_ms=step1 * 1e3,
                    comm_ms=pred["comm_s"] * 1e3,
                    exposed_ms=pred["exposed_s"] * 1e3,
                    other_collectives_ms=(pred["buffers_s"] + pred["own_s"]) * 1e3,
                    buckets=pred["buckets"],
                    backward_ms=profile["backward_s"] * 1e3,
                    predicted_ms=pred["step_s"] * 1e3,
                    no_overlap_ms=(step1 + pred["comm_s"] + pred["buffers_s"] + pred["own_s"]) * 1e3,
                    measured_ms=measured * 1e3,
                    error=pred["step_s"] / measured - 1,
                )
            )
    return rows


# The datasheet path divides FLOPs by a peak, which only holds while the GPU is busy computing. A
# training step (forward, backward, optimizer) launches at least dozens of kernels, each costing
# the host a few microseconds to launch; below this the step time is set by those launches, not
# by FLOPs, and FLOPs / peak would flatter it by orders of magnitude (the seed CNN came out at
# microseconds per step). Such an entry needs a measured GPU row (--gpu-results) instead.
LAUNCH_FLOOR_S = 100e-6


def _shape_diff(want: dict | None, have: dict | None) -> str:
    if not want or not have:
        return "its configuration is not recorded"
    keys = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    return ", ".join(f"{k} {have.get(k)!r} vs {want.get(k)!r}" for k in keys)


def gpu_compute(entry: str, flops: dict, gpu_configs: dict[str, Config] | None):
    """(seconds per step at N ranks as a function of N, per-device batch, source) on one GPU, or a
    string saying why there is none. Measured: a world-1 GPU run whose shape (workload, model,
    micro-batch, lengths, compile: dltrain.bench.measure.compute_shape) equals the entry's, bf16
    first, the slowest of N ranks' steps from its step-time distribution; a GPU run of the same
    entry name or workload with another shape is refused, not borrowed. Else from the datasheet
    (no distribution: every step alike), refused below LAUNCH_FLOOR_S."""
    want = flops.get("shape")
    rows = [
        (name, cfg)
        for name, cfg in (gpu_configs or {}).items()
        if (cfg.kind, cfg.mode, cfg.world_size) == ("dltrain", "throughput", 1)
        and cfg.mean("step_time_ms_p50")
        and cfg.mean("samples_per_s")
    ]
    same = sorted(((n, c) for n, c in rows if want and c.shape == want), key=lambda nc: nc[1].precision != "bf16")
    if same:
        name, cfg = same[0]
        p50 = cfg.mean("step_time_ms_p50") / 1e3
        return (
            (lambda n, cfg=cfg: slowest_of(cfg, n)),
            round(cfg.mean("samples_per_s") * p50),
            f"measured on a GPU ({name})",
        )
    kin = [
        (n, c) for n, c in rows if c.entry == entry or (want and (c.shape or {}).get("workload") == want["workload"])
    ]
    if kin:
        name, cfg = kin[0]
        return (
            f"the GPU results' {name} computes another step than this entry ({_shape_diff(want, cfg.shape)}): "
            "its step time is not this entry's; run the GPU suite with this entry's configuration"
        )
    per_sample = flops.get("flops_per_sample_measured") or flops.get("flops_per_sample_analytic")
    batch = flops.get("micro_batch")
    if not per_sample or not batch:
        return None
    step = per_sample * batch / (GPU_PEAK_BF16 * ASSUMED_MFU)
    if step < LAUNCH_FLOOR_S:
        return (
            f"its datasheet compute is {step * 1e6:.1f} µs per step, below the {LAUNCH_FLOOR_S * 1e6:.0f} µs "
            "launch floor "
            "(a step that short is bound by kernel launches, not FLOPs): give a measured GPU run (--gpu-results)"
        )
    return (
        (lambda n: step),
        batch,
        f"datasheet: FLOPs / ({GPU} bf16 {GPU_PEAK_BF16 / 1e12:.0f} TFLOP/s x assumed MFU {ASSUMED_MFU})",
    )


def compute_refusals(flops: dict[str, dict], gpu_configs: dict[str, Config] | None) -> dict[str, str]:
    """Entries with a step profile whose GPU compute gpu_compute refuses, and why."""
    out = {}
    for entry, meas in flops.items():
        why = gpu_compute(entry, meas, gpu_configs) if meas.get("step_profile") else None
        if isinstance(why, str):
            out[entry] = why + ": not projected"
    return out


CHECK_TOLERANCE = 0.15  # a workload whose predicted step missed its measured one by more is not projected


def refused_projections(checks: list[ValidationRow]) -> dict[str, str]:
    """Entries whose step-model check on this host missed by more than CHECK_TOLERANCE: the model
    is wrong for them, and projecting them would extrapolate the error."""
    return {
        r.entry: f"the step model missed its measured {r.world_size}-process step by {r.error:+.0%} "
        f"(tolerance {CHECK_TOLERANCE:.0%}): not projected"
        for r in checks
        if abs(r.error) > CHECK_TOLERANCE
    }


def projection(
    flops: dict[str, dict], gpu_configs: dict[str, Config] | None = None, refused: dict[str, str] | None = None
) -> list[ProjectionRow]:
    """PROJECTED rows per entry and GPU count; see NcclModel and gpu_compute for the inputs.
    Readiness of the gradients is the CPU profile's, as fractions of backward, and backward's
    share of the GPU step the profile's share too (both stated with every row). Entries in
    `refused` (refused_projections) get none."""
    rows = []
    for entry, meas in flops.items():
        if entry in (refused or {}):
            continue
        profile, compute = meas.get("step_profile"), gpu_compute(entry, meas, gpu_configs)
        if not profile or not compute or isinstance(compute, str):  # a refusal: compute_refusals reports it
            continue
        step_at, batch, source = compute
        total = profile["forward_s"] + profile["backward_s"] + profile["optimizer_s"]
        share = profile["backward_s"] / total
        for n in PROJECTED_WORLDS:
            step1 = step_at(n)
            scaled = {
                "backward_s": step1 * share,
                "buffer_bytes": profile["buffer_bytes"],
                "grads": [(b, r / profile["backward_s"] * step1 * share) for b, r in profile["grads"]],
            }
            links = NcclModel(n)
            pred = predict_step(step1, scaled, links, profile.get("bucket_cap_mb"))
            rows.append(
                ProjectionRow(
                    entry=entry,
                    world_size=n,
                    nodes=links.nodes,
                    link=links.link,
                    compute_source=source,
                    compute_ms=step1 * 1e3,
                    backward_share=share,
                    comm_ms=pred["comm_s"] * 1e3,
                    exposed_ms=(pred["step_s"] - step1) * 1e3,
                    step_ms=pred["step_s"] * 1e3,
                    efficiency=step_at(1) / pred["step_s"],
                    samples_per_s=n * batch / pred["step_s"],
                    grad_mb=sum(b for b, _ in profile["grads"]) / 2**20,
                    label="PROJECTED",
                )
            )
    return rows


def read_gpu_configs(gpu_results: str | Path | None) -> dict[str, Config] | None:
    """The configs of a GPU suite's summary.json (e.g. gpu_single), refused if not run on a GPU."""
    if not gpu_results:
        return None
    from dltrain.recipe import RecipeError

    path = Path(gpu_results) / "summary.json"
    if not path.is_file():
        raise RecipeError(
            f"--gpu-results {gpu_results}: no summary.json there (give a `dltrain bench gpu_single` output directory)"
        )
    summary = read_summary(path)
    if (summary.get("environment") or {}).get("device") != "cuda":
        raise RecipeError(
            f"--gpu-results {gpu_results}: its runs did not run on a GPU; projecting CPU compute onto GPU links "
            "is refused"
        )
    return summary["configs"]
