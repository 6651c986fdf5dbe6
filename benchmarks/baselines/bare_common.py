"""What the hand-written baselines share: their command line and an honest clock.

Every baseline takes the flags of benchmarks/baselines/cnn_bare.py (--steps timed steps after
--warmup untimed ones, --batch, --precision, --seed) plus the recipe it mirrors (--recipe,
--profile, --set), so model, data and hyperparameters come from the same file dltrain reads, and
prints one JSON line with its steady-state train samples/s and step-time percentiles, timed
like dltrain's StepTimer: each step on its own clock, the device synchronized at its end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args(description: str, default_recipe: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipe", default=default_recipe)
    ap.add_argument("--profile")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", type=int, help="default: the recipe's train.global_batch_size")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default: the recipe's train.precision")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def load(args):
    """The recipe with the flags applied, and the device."""
    from dltrain.recipe import load_recipe

    sets = list(args.overrides)
    if args.batch:
        sets.append(f"train.global_batch_size={args.batch}")
    if args.precision:
        sets.append(f"train.precision={args.precision}")
    recipe = load_recipe(args.recipe, args.profile, sets)
    return recipe, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` calls of step(i) after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    times = []
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
        sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(name: str, args, batch: int, precision: str, step_times: list[float], **extra) -> None:
    q = statistics.quantiles(step_times, n=10) if len(step_times) >= 2 else step_times * 9
    print(json.dumps({"baseline": name, "steps": len(step_times), "batch": batch, "precision": precision,
                      "train_samples_per_s": len(step_times) * batch / sum(step_times),
                      "step_time_ms_p50": 1e3 * statistics.median(step_times), "step_time_ms_p90": 1e3 * q[8],
                      **extra}), flush=True)
