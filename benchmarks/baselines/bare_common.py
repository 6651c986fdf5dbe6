"""What the hand-written baselines share: their command line and an honest clock.

Every baseline takes the flags of benchmarks/baselines/cnn_bare.py (--steps timed steps after
--warmup untimed ones, --batch, --precision, --seed) plus the recipe it mirrors (--recipe,
--profile, --set), so model, data and hyperparameters come from the same file dltrain reads, and
prints one JSON line with its steady-state train samples/s.
"""

from __future__ import annotations

import argparse
import json
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


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` calls of step(i) after `warmup` untimed ones, the device synchronized."""
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def report(name: str, args, batch: int, precision: str, elapsed: float, **extra) -> None:
    print(json.dumps({"baseline": name, "steps": args.steps, "batch": batch, "precision": precision,
                      "train_samples_per_s": args.steps * batch / elapsed, **extra}), flush=True)
