"""What the hand-written baselines share: their command line and an honest clock.

Every baseline takes the flags of benchmarks/baselines/cnn_bare.py (--steps timed steps after
--warmup untimed ones, --batch, --precision, --seed) plus the recipe it mirrors (--recipe,
--profile, --set), so model, data and hyperparameters come from the same file dltrain reads, and
prints one JSON line with its steady-state train samples/s and step-time percentiles, clocked as
dltrain clocks itself (dltrain.metrics.StepClock): samples/s is steps x batch over one wall clock
around the whole timed window of consecutive steps, the device synchronized at its two edges only;
the percentiles come from per-step times taken without a synchronize (host times on a CPU, CUDA
events on a GPU, read after the window).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import NamedTuple

import torch

from dltrain.metrics import step_mark


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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync_debug(device)
    return recipe, device


def sync_debug(device: torch.device) -> None:
    """DLTRAIN_SYNC_DEBUG=warn|error: torch reports every host wait for the GPU, as in a dltrain run,
    so device_check.sh counts the baselines' host syncs beside dltrain's."""
    if device.type == "cuda" and os.environ.get("DLTRAIN_SYNC_DEBUG"):
        torch.cuda.set_sync_debug_mode(os.environ["DLTRAIN_SYNC_DEBUG"])


class Timing(NamedTuple):
    window_s: float  # wall time of the timed window, the device synchronized at its edges
    step_times_s: list[float]  # each step of it, for the percentiles


class WindowClock:
    """start() before the first timed step, step_done() at the end of every step, stop() after the
    last: one wall clock over the window, per-step marks inside it that never wait for the device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        sync()
        self.t0 = time.perf_counter()
        self.marks = [step_mark(self.cuda)]

    def step_done(self) -> None:
        self.marks.append(step_mark(self.cuda))

    def stop(self) -> Timing:
        sync()
        window = time.perf_counter() - self.t0
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:  # synchronized: every event has completed
            return Timing(window, [a.elapsed_time(b) / 1e3 for a, b in pairs])
        return Timing(window, [b - a for a, b in pairs])


def timed(step, steps: int, warmup: int, device: torch.device) -> Timing:
    """`steps` calls of step(i) after `warmup` untimed ones, clocked as one window."""
    for i in range(warmup):
        step(i)
    clock = WindowClock(device)
    clock.start()
    for i in range(warmup, warmup + steps):
        step(i)
        clock.step_done()
    return clock.stop()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def report(name: str, args, batch: int, precision: str, timing: Timing, **extra) -> None:
    times = timing.step_times_s
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    print(
        json.dumps(
            {
                "baseline": name,
                "steps": len(times),
                "batch": batch,
                "precision": precision,
                "train_samples_per_s": len(times) * batch / timing.window_s,
                "window_s": timing.window_s,
                "step_time_ms_p50": 1e3 * statistics.median(times),
                "step_time_ms_p90": 1e3 * q[8],
                **extra,
            }
        ),
        flush=True,
    )
