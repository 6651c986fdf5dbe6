"""Time-to-accuracy records: one record config trained over several seeds, aggregated honestly.

The rules (benchmarks/README.md, "Records"): a fixed schedule, the held-out metric read once at
the end, never used to stop; the record is the mean over n seeds with every seed's value listed,
and two clocks: `train_s` (first batch to the end of the last step, evaluation and checkpoint
writes excluded: dltrain.metrics.StepClock) and `wall_s` (process start to exit, measured around
the process by the suite runner).
"""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value), and the values themselves."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "mean": None, "std": None, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values), "std": std, "values": values}


def aggregate(runs: list[dict], metric: str) -> dict:
    """`runs`: one dict per seed with `seed`, `metric` (the value of `metric`), `train_s`, `wall_s`,
    and `ok`. Failed seeds are counted, not averaged in: a record needs every seed."""
    done = [r for r in runs if r.get("ok") and r.get("metric") is not None]
    return {
        "metric_name": metric,
        "seeds": [r["seed"] for r in runs],
        "failed_seeds": [r["seed"] for r in runs if r not in done],
        "metric": mean_std([r["metric"] for r in done]),
        "train_s": mean_std([r["train_s"] for r in done]),
        "wall_s": mean_std([r["wall_s"] for r in done]),
    }


def verdict(agg: dict, target: float, mode: str) -> bool | None:
    """Whether the mean meets the target (None when a seed failed: no record then)."""
    mean = agg["metric"]["mean"]
    if agg["failed_seeds"] or mean is None or math.isnan(mean):
        return None
    return mean >= target if mode == "max" else mean <= target


def _pm(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}"


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per record config. Each row: name, agg (from aggregate), target,
    mode, met (verdict), and optionally reference {train_s, what}."""
    out = ["| record | n | metric (mean ± std) | every seed | target | met | train_s | wall_s | reference train_s | speed-up |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        agg, ref = row["agg"], row.get("reference") or {}
        fmt = ".4f" if abs(agg["metric"]["mean"] or 0) < 1 else ".3g"
        each = ", ".join(f"{v:{fmt}}" for v in agg["metric"]["values"])
        if agg["failed_seeds"]:
            each += f" (failed: seeds {', '.join(map(str, agg['failed_seeds']))})"
        sign = ">=" if row["mode"] == "max" else "<="
        met = {True: "yes", False: "no", None: "no record"}[row["met"]]
        ref_s = ref.get("train_s")
        speedup = f"{ref_s / agg['train_s']['mean']:.1f}x" if ref_s and agg["train_s"]["mean"] else "-"
        short = ref.get("metric") is not None and not (ref["metric"] >= row["target"] if row["mode"] == "max"
                                                       else ref["metric"] <= row["target"])
        if short and speedup != "-":  # the reference never got there: its time is a lower bound, if anything
            speedup = f"> {speedup} (reference short of the target)" if ref_s >= agg["train_s"]["mean"] else \
                "n/a (reference short of the target)"
        reached = f", {ref['metric_name']} {ref['metric']:.4g}" if ref.get("metric") is not None else ""
        ref_text = f"{ref_s:.1f} s ({ref['what']}{reached})" if ref_s else "-"
        out.append(f"| {row['name']} | {agg['metric']['n']} | {agg['metric_name']} {_pm(agg['metric'], fmt)} | {each} "
                   f"| {sign} {row['target']:g} | {met} | {_pm(agg['train_s'], '.1f')} s | {_pm(agg['wall_s'], '.1f')} s "
                   f"| {ref_text} | {speedup} |")
    return out
