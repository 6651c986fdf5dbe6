"""From results.jsonl to summary.json: repeats aggregated, baseline ratios, scaling, the step model's
check against measured runs, the communication fits, and GPU projections (dltrain.bench.scaling),
built once into a typed Summary that the render stage (markdown, plots) reads by attribute.
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dltrain.bench.result import (
    BaselineRow,
    CommRun,
    Config,
    OverheadRow,
    ProjectionRow,
    Result,
    ScalingRow,
    Stats,
    ValidationRow,
    VariantRow,
    read_results,
)

FIGURES = [
    "samples_per_s",
    "tokens_per_s",
    "padded_tokens_per_s",
    "step_time_ms_p50",
    "step_time_ms_p90",
    "data_wait_share",
    "achieved_flops_per_s",
    "mfu",
    "time_to_target_s",
    "peak_memory_mb",
    "wall_s",
    # outside the steady clock
    "eval_s",
    "checkpoint_s",
    "train_wall_s",
    "overall_samples_per_s",
    "clock_agreement",
    # a record suite's training clock
    "train_s",
]
HIGHER_IS_BETTER = {
    "samples_per_s",
    "tokens_per_s",
    "padded_tokens_per_s",
    "achieved_flops_per_s",
    "mfu",
    "overall_samples_per_s",
    "val/accuracy",
    "test/accuracy",
    "train/accuracy",
}
DESCRIPTORS = [
    "kind",
    "entry",
    "workload",
    "mode",
    "pair",
    "reference",
    "world_size",
    "nnodes",
    "precision",
    "deepspeed_stage",
    "compile",
    "shape",
]  # what a configuration is: equal in every run of it


def _figures(result: Result) -> dict[str, float]:
    out = {k: v for k in FIGURES if k != "peak_memory_mb" and isinstance(v := getattr(result, k), (int, float))}
    if result.peak_memory_mb:
        out["peak_memory_mb"] = result.peak_memory_mb
    for k, v in result.metrics.items():
        if isinstance(v, (int, float)) and k.split("/")[-1] in ("accuracy", "loss", "mse", "mse_ratio"):
            out[k] = v
    if result.target_value is not None:  # the target's metric, whatever its name
        out[result.target["metric"]] = result.target_value
    return out


def aggregate(results: list[Result]) -> dict[str, Config]:
    """Each configuration's results over its repeats, in the order they first ran."""
    configs: dict[str, Config] = {}
    values: dict[str, dict[str, list[float]]] = {}
    percentiles: dict[str, list[list[float]]] = {}
    for res in results:
        cfg = configs.get(res.config)
        if cfg is None:
            cfg = configs[res.config] = Config(**{k: getattr(res, k) for k in DESCRIPTORS})
        cfg.runs += 1
        cfg.workload = cfg.workload or res.workload
        if not res.ok:
            cfg.failed += 1
            cfg.errors.append(res.error)
            continue
        for k, v in _figures(res).items():
            values.setdefault(res.config, {}).setdefault(k, []).append(v)
        if res.step_time_ms_percentiles:
            percentiles.setdefault(res.config, []).append(res.step_time_ms_percentiles)
        if res.target:
            cfg.target = res.target
        if res.mode == "time_to_target":
            cfg.reached += res.time_to_target_s is not None
        if res.flops_basis:
            cfg.flops_basis = res.flops_basis
        if res.peak_source:
            cfg.peak_source, cfg.peak_flops_per_s = res.peak_source, res.peak_flops_per_s
    for name, cfg in configs.items():
        cfg.figures = {k: Stats.of(v) for k, v in values.get(name, {}).items()}
        if name in percentiles:  # p1..p99 of the step time, averaged over the repeats percentile by percentile
            cfg.step_time_ms_percentiles = [statistics.fmean(p) for p in zip(*percentiles[name])]
    return configs


def variants(results: list[Result], configs: dict[str, Config]) -> list[VariantRow]:
    """Each config of an entry with a `reference` against the reference entry's config of the same
    world size, precision and mode: samples/s over the reference's, per repeat, then averaged."""
    ok = {(r.config, r.repeat): r for r in results if r.ok and r.samples_per_s}
    axes = ("world_size", "nnodes", "precision", "mode", "kind")
    rows = []
    for name, cfg in configs.items():
        ref = next(
            (
                n
                for n, c in configs.items()
                if cfg.reference and c.entry == cfg.reference and all(getattr(c, a) == getattr(cfg, a) for a in axes)
            ),
            None,
        )
        if ref is None:
            continue
        ratios = [
            res.samples_per_s / ok[(ref, rep)].samples_per_s
            for (c, rep), res in ok.items()
            if c == name and (ref, rep) in ok
        ]
        rows.append(
            VariantRow(
                config=name,
                reference_config=ref,
                samples_per_s=cfg.mean("samples_per_s"),
                reference_samples_per_s=configs[ref].mean("samples_per_s"),
                ratio=Stats.of(ratios) if ratios else None,
            )
        )
    return rows


def _pairs(by_key: dict[tuple[str, int], Result], name: str, pair: str):
    """(baseline run, its dltrain run) per repeat: the two ran back to back."""
    for (config, repeat), res in by_key.items():
        ours = by_key.get((pair, repeat))
        if config == name and ours is not None:
            yield res, ours


def baseline_ratios(results: list[Result], configs: dict[str, Config]) -> list[BaselineRow]:
    """dltrain samples/s over each baseline's, per repeat (the two ran back to back), then averaged.
    Also the ratio of median step times (baseline p50 / dltrain p50): the same comparison, but
    deaf to bursts of a shared machine that a mean over a short window catches on one side only."""
    by_key = {(r.config, r.repeat): r for r in results if r.ok}
    rows = []
    for name, cfg in configs.items():
        if cfg.kind == "dltrain" or not cfg.pair:
            continue
        ratios, p50_ratios = [], []
        for res, ours in _pairs(by_key, name, cfg.pair):
            if res.samples_per_s and ours.samples_per_s:
                ratios.append(ours.samples_per_s / res.samples_per_s)
                if res.step_time_ms_p50 and ours.step_time_ms_p50:
                    p50_ratios.append(res.step_time_ms_p50 / ours.step_time_ms_p50)
        pair = configs.get(cfg.pair)
        rows.append(
            BaselineRow(
                config=name,
                baseline=cfg.kind,
                entry=cfg.entry,
                precision=cfg.precision,
                dltrain_config=cfg.pair,
                dltrain_samples_per_s=pair.mean("samples_per_s") if pair else None,
                baseline_samples_per_s=cfg.mean("samples_per_s"),
                ratio=Stats.of(ratios) if ratios else None,
                ratio_p50_step=Stats.of(p50_ratios) if p50_ratios else None,
                target=0.95 if cfg.kind == "bare" else None,
            )
        )
    return rows


def overhead_rows(results: list[Result], configs: dict[str, Config]) -> list[OverheadRow]:
    """Each bare baseline against its dltrain pair, per repeat (the two ran back to back), then
    averaged: microseconds per step dltrain spends beyond the bare loop, from the median step
    times and from the timed window's mean (global batch / samples/s). Where the time goes:
    `python -m dltrain.bench.overhead RECIPE`."""
    by_key = {(r.config, r.repeat): r for r in results if r.ok}
    rows = []
    for name, cfg in configs.items():
        if cfg.kind != "bare" or not cfg.pair:
            continue
        p50, mean, bare_p50 = [], [], []
        for bare, ours in _pairs(by_key, name, cfg.pair):
            if bare.step_time_ms_p50 and ours.step_time_ms_p50:
                p50.append(1e3 * (ours.step_time_ms_p50 - bare.step_time_ms_p50))
                bare_p50.append(1e3 * bare.step_time_ms_p50)
            batch = (ours.batch or {}).get("global")
            if batch and bare.samples_per_s and ours.samples_per_s:
                mean.append(1e6 * batch * (1 / ours.samples_per_s - 1 / bare.samples_per_s))
        if p50 or mean:
            rows.append(
                OverheadRow(
                    config=name,
                    dltrain_config=cfg.pair,
                    bare_step_us_p50=statistics.fmean(bare_p50) if bare_p50 else None,
                    overhead_us_p50=Stats.of(p50) if p50 else None,
                    overhead_us_mean=Stats.of(mean) if mean else None,
                    overhead_share_p50=statistics.fmean(p50) / statistics.fmean(bare_p50) if p50 else None,
                )
            )
    return rows


def rescale_cpu_mfu(results: list[Result], peaks: dict[str, float]) -> None:
    """CPU MFU against the best peak sampled over the whole suite (results.jsonl holds the value
    against the best peak known when the run ended)."""
    for res in results:
        if res.peak_procs and res.achieved_flops_per_s and res.precision in peaks:
            res.peak_flops_per_s = peaks[res.precision] * res.peak_procs
            res.mfu = res.achieved_flops_per_s / res.peak_flops_per_s


def read_comm(out_dir: Path) -> list[CommRun]:
    """What `dltrain bench comm` (or a suite's comm section) wrote under out_dir: one entry per world size."""
    paths = sorted(out_dir.glob("comm/*/comm.json")) + (
        [out_dir / "comm.json"] if (out_dir / "comm.json").is_file() else []
    )
    return [CommRun.model_validate_json(p.read_text()) for p in paths]


class Summary(BaseModel):
    """summary.json: the suite's configurations and every table derived from them, built once by
    build_summary and read by attribute by the render stage (markdown, plots)."""

    model_config = ConfigDict(extra="forbid")

    suite: str | None = None
    created_utc: str = ""
    repeats: int | None = None
    environment: dict[str, Any] = {}
    cpu_peak_flops_per_s: dict[str, float] = {}
    cpu_threads: int | None = None
    flops: dict[str, Any] = {}  # the harness's FLOP count and step profile per entry (dltrain.bench.flops)
    configs: dict[str, Config] = {}
    baselines: list[BaselineRow] = []
    overhead: list[OverheadRow] = []
    variants: list[VariantRow] = []
    scaling: list[ScalingRow] = []
    comm: list[CommRun] = []
    validation: list[ValidationRow] = []
    projection_refused: dict[str, str] = {}  # entry -> why it is not projected
    projection: list[ProjectionRow] = []
    gpu_results: str | None = None
    runs: int = 0
    failed: int = 0


def build_summary(out_dir: Path, gpu_results: str | Path | None = None) -> Summary:
    from dltrain.bench.scaling import (
        compute_refusals,
        projection,
        read_gpu_configs,
        refused_projections,
        scaling,
        validation,
    )

    results = read_results(out_dir)
    meta_path = out_dir / "bench_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rescale_cpu_mfu(results, meta.get("cpu_peak_flops_per_s", {}))
    configs = aggregate(results)
    comm = read_comm(out_dir)
    fits = [f for c in comm for f in c.fits]
    gpu_results = gpu_results or meta.get("gpu_results")
    env = next((r.environment for r in results if r.environment), {})
    # A GPU suite's own world-1 runs are GPU compute; a CPU suite's never are.
    gpu_configs = read_gpu_configs(gpu_results) if gpu_results else (configs if env.get("device") == "cuda" else None)
    summary = Summary(
        suite=(meta.get("suite") or {}).get("name") or (results[0].suite if results else None),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        repeats=meta.get("repeats"),
        environment=env,
        cpu_peak_flops_per_s=meta.get("cpu_peak_flops_per_s", {}),
        cpu_threads=(meta.get("suite") or {}).get("cpu_threads"),
        flops=meta.get("flops", {}),
        configs=configs,
        baselines=baseline_ratios(results, configs),
        overhead=overhead_rows(results, configs),
        variants=variants(results, configs),
        scaling=scaling(configs),
        comm=comm,
        validation=(checks := validation(configs, meta.get("flops", {}), fits)),
        projection_refused=(
            refused := refused_projections(checks) | compute_refusals(meta.get("flops", {}), gpu_configs)
        ),
        projection=projection(meta.get("flops", {}), gpu_configs, refused),
        gpu_results=str(gpu_results) if gpu_results else None,
        runs=len(results),
        failed=sum(not r.ok for r in results),
    )
    (out_dir / "summary.json").write_text(json.dumps(summary.model_dump(mode="json"), indent=2) + "\n")
    return summary
