"""`dltrain bench compare OLD NEW`: per-figure ratios between two suite runs; regressions beyond noise.

A figure regresses when it moved the wrong way by more than the noise allowance: the larger of a
fixed tolerance (default 10%, for single runs whose spread is unknown) and three times the
combined relative standard deviation of the two sides' repeats. Exit code 1 on a regression, so
CI can gate on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from dltrain.bench.report import HIGHER_IS_BETTER
from dltrain.bench.result import read_summary
from dltrain.recipe import RecipeError, _first_error

EXIT_REGRESSION = 1
COMPARED = [
    "samples_per_s",
    "tokens_per_s",
    "step_time_ms_p50",
    "step_time_ms_p90",
    "mfu",
    "time_to_target_s",
    "val/accuracy",
    "test/accuracy",
]


def load_summary(path: Path) -> dict:
    path = Path(path)
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise RecipeError(f"{path}: no summary.json (give a `dltrain bench` output directory)")
    try:
        return read_summary(file)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValidationError as exc:
        raise RecipeError(f"{file}: not a `dltrain bench` summary ({_first_error(exc)})") from None


def compare(old: dict, new: dict, tolerance: float = 0.10) -> list[dict]:
    rows = []
    for name, new_cfg in new.get("configs", {}).items():
        old_cfg = old.get("configs", {}).get(name)
        if not old_cfg:
            continue
        for key in COMPARED:
            a, b = old_cfg.figures.get(key), new_cfg.figures.get(key)
            if not a or not b or not a.mean:
                continue
            ratio = b.mean / a.mean
            noise = 3 * math.hypot(a.std, b.std) / abs(a.mean)
            allowed = max(tolerance, noise)
            worse = (1 - ratio) if key in HIGHER_IS_BETTER else (ratio - 1)
            rows.append(
                {
                    "config": name,
                    "figure": key,
                    "old": a.mean,
                    "new": b.mean,
                    "ratio": ratio,
                    "allowed": allowed,
                    "regression": worse > allowed,
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no configuration with figures in common")
        return
    width = max(len(r["config"]) for r in rows)
    print(f"{'config':<{width}}  {'figure':<18} {'old':>12} {'new':>12} {'new/old':>8}  noise")
    for r in rows:
        flag = "  REGRESSION" if r["regression"] else ""
        print(
            f"{r['config']:<{width}}  {r['figure']:<18} {r['old']:>12.4g} {r['new']:>12.4g} {r['ratio']:>8.3f}  "
            f"±{100 * r['allowed']:.0f}%{flag}"
        )


def run_compare(old_dir: str, new_dir: str, tolerance: float = 0.10) -> int:
    rows = compare(load_summary(Path(old_dir)), load_summary(Path(new_dir)), tolerance)
    print_table(rows)
    bad = [r for r in rows if r["regression"]]
    if bad:
        print(f"dltrain bench compare: {len(bad)} regression(s) beyond noise")
        return EXIT_REGRESSION
    print("dltrain bench compare: no regression beyond noise")
    return 0
