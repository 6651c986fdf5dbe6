"""The typed rows the pipeline writes and reads back: a Result is one run (one line of
results.jsonl), a Config the Results of one configuration aggregated over its repeats (summary.json's
`configs`), Stats the mean, spread and range of one figure, and one row type per table the report
derives from them (BaselineRow, VariantRow, ScalingRow, ValidationRow, ProjectionRow, CommRun).
Every stage after the run (report, render, plots, scaling, compare) takes these types, never a dict
of string keys.

Words: a *job* is a planned run (dltrain.bench.suite.Job), a *result* what one run of a job gave, a
*config* a job's results over the repeats, a *figure* one number of a result (samples/s, MFU ...).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dltrain.bench.perfmodel import Fit


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stats(_Row):
    """Mean, sample standard deviation (n - 1; 0 for one value), range and count of one figure."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        values = [float(v) for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(mean=statistics.fmean(values), std=std, min=min(values), max=max(values), n=len(values))


class Result(_Row):
    """One run: what the job was, how it went, and the figures of its summary.json (None where the
    run reports none: a failed run, a baseline script, a run without text tokens)."""

    suite: str
    config: str
    kind: str
    entry: str
    mode: Literal["throughput", "time_to_target", "record"]  # record: a seed or reference run of a record suite
    pair: str | None = None
    reference: str | None = None
    world_size: int
    nnodes: int = 1
    precision: str
    deepspeed_stage: int | None = None
    compile: bool = False
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    repeat: int = 0
    run_dir: str = ""
    warmup_steps: int = 0
    tf32: bool = False
    cpu_threads: int | None = None
    wall_s: float | None = None
    command: str = ""
    # from the run's summary.json
    workload: str | None = None
    samples_per_s: float | None = None
    step_time_ms_p50: float | None = None
    step_time_ms_p90: float | None = None
    step_time_ms_percentiles: list[float] | None = None
    data_wait_share: float | None = None
    steady_steps: int | None = None
    # outside the steady clock: evaluation and checkpoint writes, and the clock's cross-check
    eval_s: float | None = None
    checkpoint_s: float | None = None
    train_wall_s: float | None = None
    overall_samples_per_s: float | None = None
    clock_agreement: float | None = None
    tokens_per_s: float | None = None
    padded_tokens_per_s: float | None = None
    run_mfu: float | None = None  # the run's own MFU; the harness recomputes `mfu` from its counts
    time_to_target_s: float | None = None
    target: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    batch: dict[str, Any] | None = None
    shape: dict[str, Any] | None = None  # what one step computes (dltrain.bench.measure.compute_shape)
    memory: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    wandb_run_id: str | None = None
    # a record suite's runs (dltrain.bench.ttt): the seed, the run's own training clock (first batch to
    # last step, evaluation excluded), its steps, whether it ran in the harness process, and what a
    # reference run is
    seed: int | None = None
    train_s: float | None = None
    steps: int | None = None
    in_process: bool = False
    note: str | None = None
    # from the harness's FLOP count and peak (dltrain.bench.flops.add_flops)
    flops: dict[str, Any] | None = None
    flops_source: str | None = None
    flops_basis: str | None = None
    achieved_flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    peak_source: str | None = None
    peak_procs: int | None = None
    mfu: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def target_value(self) -> float | None:
        """The value of the run's target metric (target.metric), if it reported one."""
        value = self.metrics.get((self.target or {}).get("metric"))
        return value if isinstance(value, (int, float)) else None

    @property
    def peak_memory_mb(self) -> float | None:
        mem = self.memory or {}
        peak = mem.get("cuda_max_allocated_bytes", mem.get("cpu_peak_rss_bytes"))
        return peak / 2**20 if peak else None


def append_result(path: Path, result: Result) -> None:
    """One line of results.jsonl, written as the run ends (a suite cut short keeps what finished)."""
    with path.open("a") as f:
        f.write(result.model_dump_json() + "\n")


def read_results(out_dir: Path) -> list[Result]:
    path = out_dir / "results.jsonl"
    if not path.is_file():
        return []
    return [Result.model_validate_json(ln) for ln in path.read_text().splitlines() if ln.strip()]


class Config(_Row):
    """One configuration's results over its repeats: what it is, how many runs failed (and the
    errors), and each figure's Stats."""

    kind: str
    entry: str
    workload: str | None = None
    mode: str
    pair: str | None = None
    reference: str | None = None
    world_size: int
    nnodes: int = 1
    precision: str
    deepspeed_stage: int | None = None
    compile: bool = False
    shape: dict[str, Any] | None = None
    runs: int = 0
    failed: int = 0
    errors: list[str | None] = []
    target: dict[str, Any] | None = None
    reached: int = 0  # time_to_target runs that reached the target
    flops_basis: str | None = None  # what the FLOP/s and MFU count: samples, or text's padded tokens
    peak_source: str | None = None
    peak_flops_per_s: float | None = None
    figures: dict[str, Stats] = {}
    step_time_ms_percentiles: list[float] | None = None  # p1..p99, averaged over the repeats

    def mean(self, figure: str) -> float | None:
        """The mean over repeats of `figure` (None when no run reported it)."""
        stats = self.figures.get(figure)
        return stats.mean if stats else None


def read_summary(path: Path) -> dict:
    """summary.json with its configs as Config."""
    summary = json.loads(path.read_text())
    summary["configs"] = {name: Config.model_validate(c) for name, c in summary.get("configs", {}).items()}
    return summary


# The summary's derived tables (dltrain.bench.report.build_summary), one row type per table: built
# once from the Configs, written to summary.json in this field order, read by attribute by the
# render stage (markdown, plots).


class BaselineRow(_Row):
    """dltrain against one of its baselines at one precision: samples/s over the baseline's per
    repeat, and the baseline's median step time over dltrain's (report.baseline_ratios)."""

    config: str
    baseline: str
    entry: str
    precision: str
    dltrain_config: str
    dltrain_samples_per_s: float | None
    baseline_samples_per_s: float | None
    ratio: Stats | None
    ratio_p50_step: Stats | None
    target: float | None  # the ratio dltrain must reach, if any


class OverheadRow(_Row):
    """Microseconds per step dltrain spends beyond the bare loop of the same model, data and batch
    (report.overhead_rows): per repeat, then averaged; negative when dltrain was faster."""

    config: str  # the bare baseline
    dltrain_config: str
    bare_step_us_p50: float | None
    overhead_us_p50: Stats | None  # from the median step times
    overhead_us_mean: Stats | None  # from the timed window's mean (global batch / samples/s)
    overhead_share_p50: float | None  # of the bare step


class VariantRow(_Row):
    """A setting against its reference entry at the same world size, precision and mode (report.variants)."""

    config: str
    reference_config: str
    samples_per_s: float | None
    reference_samples_per_s: float | None
    ratio: Stats | None


class ScalingRow(_Row):
    """Measured scaling of one configuration against its world-1 run (scaling.scaling)."""

    entry: str
    precision: str
    deepspeed_stage: int | None
    compile: bool
    config: str
    world_size: int
    nnodes: int
    samples_per_s: float
    speedup: float
    efficiency: float  # speedup / world_size


class ValidationRow(_Row):
    """The step model's prediction of a measured world-N step beside the measurement (scaling.validation)."""

    entry: str
    precision: str
    compile: bool
    config: str
    world_size: int
    world1_p50_ms: float | None
    slowest_of_n_ms: float
    colocated_factor: float = 1.0
    step1_ms: float
    comm_ms: float
    exposed_ms: float
    other_collectives_ms: float
    buckets: int
    backward_ms: float
    predicted_ms: float
    no_overlap_ms: float
    measured_ms: float
    error: float  # predicted / measured - 1


class ProjectionRow(_Row):
    """One entry's step at one GPU count, PROJECTED (scaling.projection)."""

    entry: str
    world_size: int
    nodes: int
    link: str
    compute_source: str
    compute_ms: float
    backward_share: float
    comm_ms: float
    exposed_ms: float
    step_ms: float
    efficiency: float
    samples_per_s: float
    grad_mb: float
    label: str


class CommTiming(_Row):
    """One collective at one message size, timed by `dltrain bench comm` (a line of its comm.jsonl)."""

    op: str
    bytes: int
    world_size: int
    backend: str
    device: str
    dtype: str
    calls: int
    time_us: float  # the slowest rank's median call
    mean_us: float
    algbw_GBps: float
    busbw_GBps: float


class CommRun(_Row):
    """What `dltrain bench comm` measured at one world size (its comm.json): the timings and the
    alpha-beta fits the step model reads (dltrain.bench.perfmodel.Fit)."""

    world_size: int
    nnodes: int | None = Field(None, exclude_if=lambda n: n is None)  # absent from results before several nodes
    backend: str
    device: str
    fits: list[Fit]
    rows: list[CommTiming]
    environment: dict[str, Any] = {}
