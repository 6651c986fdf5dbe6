"""Time-to-accuracy records: one record config trained over several seeds, reported honestly.

The rules (benchmarks/README.md, "Records"): a fixed schedule, the held-out metric read once at
the end, never used to stop; the record is the mean over n seeds with every seed's value listed,
and two clocks: `train_s` (first batch to the end of the last step, evaluation and checkpoint
writes excluded: dltrain.metrics.StepClock) and `wall_s` (process start to exit, measured around
the process by the suite runner). The seeds' Results are aggregated as a suite's repeats are
(dltrain.bench.report.aggregate); failed seeds are counted there, not averaged in.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from dltrain.bench.result import Config, Result, Stats


class RecordRow(BaseModel):
    """One record of a record suite: its settings, its seeds' runs and their aggregate, the target
    and whether the mean met it, and its reference run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: str
    profile: str | None = None
    overrides: list[str] = []
    seeds: list[int]
    metric_name: str
    target: float
    mode: str  # max or min
    config: Config  # the seeds' runs aggregated
    runs: list[Result]
    met: bool | None = None  # verdict(); None: no record (a seed failed)
    reference: Result | None = None
    reference_failed: bool = False
    interrupted: bool = False

    @property
    def failed_seeds(self) -> list[int]:
        return [r.seed for r in self.runs if not r.ok]

    @property
    def metric(self) -> Stats | None:
        return self.config.figures.get(self.metric_name)

    @property
    def environment(self) -> dict[str, Any]:
        return next((r.environment for r in self.runs if r.environment), {})


def verdict(row: RecordRow) -> bool | None:
    """Whether the mean meets the target (None when a seed failed: no record then)."""
    mean = row.metric.mean if row.metric else None
    if row.failed_seeds or mean is None or math.isnan(mean):
        return None
    return mean >= row.target if row.mode == "max" else mean <= row.target


def _pm(stats: Stats | None, fmt: str) -> str:
    if stats is None:
        return "-"
    return f"{stats.mean:{fmt}} ± {stats.std:{fmt}}"


def table(rows: list[RecordRow]) -> list[str]:
    """Markdown lines: one row per record config."""
    out = [
        "| record | n | metric (mean ± std) | every seed | target | met | train_s | wall_s | reference train_s | "
        "speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric, ref = row.metric, row.reference
        train_s, wall_s = row.config.figures.get("train_s"), row.config.figures.get("wall_s")
        fmt = ".4f" if abs(metric.mean if metric else 0) < 1 else ".3g"
        each = ", ".join(f"{r.target_value:{fmt}}" for r in row.runs if r.ok)
        if row.failed_seeds:
            each += f" (failed: seeds {', '.join(map(str, row.failed_seeds))})"
        sign = ">=" if row.mode == "max" else "<="
        met = {True: "yes", False: "no", None: "no record"}[row.met]
        ref_s = ref.train_s if ref else None
        speedup = f"{ref_s / train_s.mean:.1f}x" if ref_s and train_s and train_s.mean else "-"
        reached = ref.target_value if ref else None
        short = reached is not None and not (reached >= row.target if row.mode == "max" else reached <= row.target)
        if short and speedup != "-":  # the reference never got there: its time is a lower bound, if anything
            speedup = (
                f"> {speedup} (reference short of the target)"
                if ref_s >= train_s.mean
                else "n/a (reference short of the target)"
            )
        reached_text = f", {ref.target['metric']} {reached:.4g}" if reached is not None else ""
        ref_text = f"{ref_s:.1f} s ({ref.note}{reached_text})" if ref_s else "-"
        out.append(
            f"| {row.name} | {metric.n if metric else 0} | {row.metric_name} {_pm(metric, fmt)} | {each} "
            f"| {sign} {row.target:g} | {met} | {_pm(train_s, '.1f')} s | {_pm(wall_s, '.1f')} s "
            f"| {ref_text} | {speedup} |"
        )
    return out


def report_lines(suite, rows: list[RecordRow], interrupted: bool = False) -> list[str]:
    """report.md of a record suite (dltrain.bench.ttt.RecordSuite): the machine, the clocks, the table."""
    env = next((r.environment for r in rows if r.environment), {})
    host = ", ".join(f"{k} {env[k]}" for k in ("cpu", "gpu", "torch", "git_commit") if env.get(k))
    host += " (uncommitted changes)" if env.get("git_dirty") else ""
    lines = [
        f"# Time-to-accuracy records: {suite.name}",
        "",
        suite.description,
        "",
        f"Machine and software: {host or 'unknown'}; {suite.cpu_threads or os.cpu_count()} CPU threads per run "
        "unless its recipe sets train.cpu_threads (each record's line below gives its runs' own); "
        f"written {time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
        "train_s: first batch to the end of the last step, evaluation excluded; wall_s: "
        + (
            "the call to its return, in the harness process (imports and interpreter start paid once, outside it). "
            if suite.in_process
            else "process start to exit. "
        )
        + "Mean ± sample std over the seeds; the speed-up is the reference's train_s over the record's mean.",
        "",
    ]
    lines += table(rows)
    if interrupted:
        cut = [row.name for row in rows if row.interrupted]
        lines += [
            "",
            "Interrupted (the time budget ran out): "
            + (f"{', '.join(cut)} over the seeds that finished; " if cut else "")
            + "records not listed did not run.",
        ]
    for row in rows:
        cmd = f"dltrain train {row.recipe}" + (f" --profile {row.profile}" if row.profile else "")
        cmd += "".join(f" --set {s}" for s in row.overrides) + " --set train.seed=S"
        env = row.environment
        setup = f"{env.get('precision', '?')}, {env.get('cpu_threads', '?')} threads, {env.get('device', '?')}"
        lines += ["", f"- {row.name} ({setup}): `{cmd}`, seeds {', '.join(map(str, row.seeds))}"]
    return lines
