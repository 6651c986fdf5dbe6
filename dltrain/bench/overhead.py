"""Framework overhead: what dltrain does per training step that the bare loop does not.

Two parts, the second elsewhere:

* a profiler (`python -m dltrain.bench.overhead rnn_sine --profile cpu_test`): runs `steps` steady
  steps of dltrain's loop and of the recipe's workload's `bare` baseline (benchmarks/baselines/), each in a
  process of its own, one thread, and reports per step: wall time (unprofiled), Python function
  calls counted by cProfile (C functions included), time under the profiler in Python functions
  and in C functions, and the functions dltrain calls that the bare loop does not (or more often);
* the bench report's overhead table is dltrain.bench.report.overhead_rows: from the baseline pairs
  already in results.jsonl, dltrain's step time minus the bare loop's, in microseconds per step.

Both loops see the same model, data, batch and optimizer. dltrain's steps are counted from the
end of the warm-up: a window of `steps` unprofiled steps (wall time), then `steps` profiled ones
(calls). Each window ends inside a step's end (dltrain.testhooks.at_step_end), so every step's end
(sync point, log records at their rate, epoch changes) falls in it once; evaluation is moved past
the windows (train.eval_every), as the clock takes it out of dltrain's own figures.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "dltrain-overhead: "  # the child's result line

# ----------------------------------------------------------------------------------------------
# The profiler: one child process per loop


class OpCounter:
    """Counts the ATen operators the steps run (a TorchDispatchMode: below autograd, so backward's
    and the optimizer's too; on a CPU they run on this thread). Each costs a dispatch, several
    microseconds on a tiny tensor: the currency of a 1 ms step's overhead besides Python calls."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, Mode()


class Window:
    """Marks at the end of each step: `steps` timed, then `steps` profiled, then `steps` whose
    ATen operators are counted."""

    def __init__(self, steps: int):
        self.steps = steps
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []  # this thread's CPU time: what load on a shared machine moves least
        self.profile = cProfile.Profile(builtins=True)
        self.ops = OpCounter()
        self.done = False

    def at(self, k: int) -> None:
        """Called at the end of the k-th steady step (k = 0: the warm-up's last)."""
        n = self.steps
        if k <= n:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.thread_time())
        if k == n:
            self.profile.enable()
        elif k == 2 * n:
            self.profile.disable()
            self.ops.mode.__enter__()
        elif k == 3 * n:
            self.ops.mode.__exit__(None, None, None)
            self.done = True

    def result(self, loop: str) -> dict:
        times = [b - a for a, b in zip(self.marks, self.marks[1:])]
        cpu = [b - a for a, b in zip(self.cpu_marks, self.cpu_marks[1:])]
        return {
            "loop": loop,
            "steps": self.steps,
            "step_us_mean": 1e6 * (self.marks[-1] - self.marks[0]) / self.steps,
            "step_us_p50": 1e6 * statistics.median(times),
            "cpu_us_p50": 1e6 * statistics.median(cpu),
            **profile_figures(self.profile, self.steps),
            "aten_ops_per_step": sum(self.ops.counts.values()) / self.steps,
            "aten_ops": {k: v / self.steps for k, v in sorted(self.ops.counts.items())},
        }


def profile_figures(profile: cProfile.Profile, steps: int) -> dict:
    """Calls and profiled seconds per step, in all and per function (C functions have file '~')."""
    stats = pstats.Stats(profile).stats
    functions = {}
    for (file, line, name), (_, calls, own, _, _) in stats.items():
        if file == __file__ or "_lsprof" in name:  # this module's own marks and hook, and the profiler
            continue
        key = f"{_short(file)}:{line}({name})" if file != "~" else name
        f = functions.setdefault(key, [0.0, 0.0])
        f[0] += calls / steps
        f[1] += 1e6 * own / steps
    c_us = sum(own for key, (_, own) in functions.items() if key.startswith("<"))
    return {
        "calls_per_step": sum(c for c, _ in functions.values()),
        "profiled_us_per_step": sum(own for _, own in functions.values()),
        "python_us_per_step": sum(own for _, own in functions.values()) - c_us,
        "c_us_per_step": c_us,
        "functions": functions,  # key -> [calls per step, own microseconds per step under the profiler]
    }


def _short(file: str) -> str:
    for cut in ("site-packages/", "/dltrain/", "/benchmarks/"):
        if cut in file:
            return file.split(cut, 1)[1] if cut == "site-packages/" else cut.strip("/") + "/" + file.split(cut, 1)[1]
    return Path(file).name


def _base_sets(steps: int, warmup: int) -> list[str]:
    return [
        f"train.max_steps={warmup + 3 * steps + 1}",
        f"train.eval_every={warmup + 3 * steps + 1}",  # evaluated once, after the windows
        "train.cpu_threads=1",
        "tracking.wandb=false",
        "tracking.plots=false",
        "tracking.trackers=[]",
        "checkpoint.save_final_model=false",
        "checkpoint.save_best=false",
    ]


def run_dltrain(recipe_name: str, profile: str | None, sets: list[str], steps: int, output_dir: str) -> dict:
    import torch

    from dltrain import testhooks
    from dltrain.recipe import load_recipe
    from dltrain.run import train

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_name, profile, [*_base_sets(steps, _warmup(recipe_name, profile, sets)), *sets])
    warmup = recipe.train.warmup_steps_excluded
    window, at_step_end = Window(steps), testhooks.at_step_end

    def hook(rank: int, step: int) -> None:
        at_step_end(rank, step)
        if step >= warmup and not window.done:
            window.at(step - warmup)

    testhooks.at_step_end = hook
    try:
        train(recipe, output_dir=output_dir)
    finally:
        testhooks.at_step_end = at_step_end
    return window.result("dltrain") | {"warmup": warmup, "batch": recipe.train.global_batch_size}


def _warmup(recipe_name: str, profile: str | None, sets: list[str]) -> int:
    from dltrain.recipe import load_recipe

    return load_recipe(recipe_name, profile, sets).train.warmup_steps_excluded


def bare_argv(recipe_name: str, profile: str | None, sets: list[str], steps: int, warmup: int) -> list[str]:
    """The baseline's command line as `dltrain bench` builds it (dltrain.bench.runner.baseline_command)."""
    from dltrain import shipped
    from dltrain.recipe import load_recipe
    from dltrain.workload import get_workload

    recipe = load_recipe(recipe_name, profile, sets)
    wl = get_workload(recipe.workload)
    argv = [str(shipped.folder("baselines") / wl.baselines["bare"]), "--steps", str(3 * steps)]
    argv += ["--warmup", str(warmup), "--batch", str(recipe.train.global_batch_size)]
    argv += ["--precision", recipe.train.precision, "--seed", str(recipe.train.seed)]
    if wl.baseline_takes_recipe:
        argv += ["--recipe", recipe_name, *(["--profile", profile] if profile else [])]
        argv += [a for s in sets for a in ("--set", s)]
    return argv


def run_bare(argv: list[str], steps: int) -> dict:
    """The baseline script as __main__, its clock (bare_common.timed) replaced by the window's."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(argv[0]).parent))
    import bare_common

    window, timed = Window(steps), bare_common.timed

    def windowed(step, n: int, warmup: int, device):
        for i in range(warmup):
            step(i)
        window.at(0)
        for k in range(1, n + 1):
            step(warmup + k - 1)
            window.at(k)
        return timed(step, 1, 0, device)  # one more step, for the script's own report line

    bare_common.timed = windowed
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return window.result("bare")


def child(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child == "dltrain":
        out = run_dltrain(args.recipe, args.profile, args.overrides, args.steps, args.output_dir)
    else:
        out = run_bare(json.loads(args.argv), args.steps)
    print(MARK + json.dumps(out), flush=True)


def measure(
    recipe_name: str, profile: str | None, steps: int, sets: list[str], output_dir: Path, rounds: int = 3
) -> dict:
    """Both loops, each in its own process, `rounds` times in alternating order: {"dltrain":
    figures, "bare": figures}, the calls from the first round, the step times the least disturbed
    (the smallest) of the rounds' on a shared machine, each round's kept beside them."""
    runs = [
        _measure_once(
            recipe_name, profile, steps, sets, output_dir / f"round{i}", first="dltrain" if i % 2 == 0 else "bare"
        )
        for i in range(rounds)
    ]
    out = {}
    for loop in ("dltrain", "bare"):
        out[loop] = runs[0][loop]
        for key in ("step_us_p50", "step_us_mean", "cpu_us_p50"):
            out[loop][f"rounds_{key}"] = [r[loop][key] for r in runs]
            out[loop][key] = min(out[loop][f"rounds_{key}"])
    return out


def _measure_once(
    recipe_name: str, profile: str | None, steps: int, sets: list[str], output_dir: Path, first: str
) -> dict:
    out = {}
    warmup = _warmup(recipe_name, profile, sets)
    for loop in (first, "bare" if first == "dltrain" else "dltrain"):
        cmd = [sys.executable, "-m", "dltrain.bench.overhead", recipe_name, "--steps", str(steps), "--child", loop]
        cmd += ["--output-dir", str(output_dir), *(["--profile", profile] if profile else [])]
        cmd += [a for s in sets for a in ("--set", s)]
        if loop == "bare":
            cmd += ["--argv", json.dumps(bare_argv(recipe_name, profile, sets, steps, warmup))]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # from the folder holding this dltrain, so the children import the same one
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode or not lines:
            raise RuntimeError(f"{loop} loop failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        out[loop] = json.loads(lines[-1][len(MARK) :])
    return out


def compare(run: dict, top: int = 15) -> dict:
    """dltrain minus bare per step, and the functions whose extra profiled time is largest."""
    d, b = run["dltrain"], run["bare"]
    diff = {
        k: d[k] - b[k]
        for k in (
            "step_us_p50",
            "step_us_mean",
            "cpu_us_p50",
            "calls_per_step",
            "aten_ops_per_step",
            "python_us_per_step",
            "c_us_per_step",
        )
    }
    extra = []
    for key, (calls, own) in d["functions"].items():
        b_calls, b_own = b["functions"].get(key, (0.0, 0.0))
        if calls > b_calls + 1e-9:
            extra.append((key, calls - b_calls, own - b_own))
    extra.sort(key=lambda e: -e[2])
    ops = {k: n - b["aten_ops"].get(k, 0.0) for k, n in d["aten_ops"].items()}
    ops |= {k: -n for k, n in b["aten_ops"].items() if k not in d["aten_ops"]}
    return {
        "overhead": diff,
        "extra_functions": extra[:top],
        "aten_ops_diff": {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if abs(v) > 1e-9},
    }


def format_report(recipe_name: str, run: dict, cmp: dict) -> str:
    d, b, o = run["dltrain"], run["bare"], cmp["overhead"]
    rows = [
        ("step time p50 (us, unprofiled, least of rounds)", "step_us_p50"),
        ("step time mean (us, unprofiled, least of rounds)", "step_us_mean"),
        ("thread CPU time p50 (us, unprofiled, least)", "cpu_us_p50"),
        ("calls per step (cProfile, C included)", "calls_per_step"),
        ("ATen operators per step", "aten_ops_per_step"),
        ("Python functions' own us/step (profiled)", "python_us_per_step"),
        ("C functions' own us/step (profiled)", "c_us_per_step"),
    ]
    lines = [
        f"{recipe_name}: {d['steps']} steady steps each, batch {d['batch']}, 1 thread; "
        f"p50 per round dltrain {_us(d['rounds_step_us_p50'])}, bare {_us(b['rounds_step_us_p50'])}",
        f"{'':50} {'dltrain':>10} {'bare':>10} {'dltrain-bare':>13}",
    ]
    lines += [f"{label:50} {d[k]:10.1f} {b[k]:10.1f} {o[k]:13.1f}" for label, k in rows]
    lines += [
        f"ratio bare/dltrain: step time p50 {b['step_us_p50'] / d['step_us_p50']:.3f}, "
        f"thread CPU time p50 {b['cpu_us_p50'] / d['cpu_us_p50']:.3f}",
        "",
        "functions dltrain calls more than bare (by extra profiled us/step):",
        f"{'extra calls/step':>17} {'extra us/step':>14}  function",
    ]
    lines += [f"{calls:17.2f} {us:14.1f}  {key}" for key, calls, us in cmp["extra_functions"]]
    ops = ", ".join(f"{k} {v:+.2f}" for k, v in cmp["aten_ops_diff"].items())
    lines += ["", f"ATen operators per step, dltrain - bare: {ops or 'none'}"]
    return "\n".join(lines)


def _us(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a shipped recipe name (cnn_mnist, rnn_sine, ...) or a YAML path")
    ap.add_argument("--profile", default="cpu_test", help="the recipe's profile (default cpu_test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=200, help="steps timed, then as many profiled")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each loop, alternating (step time: the least)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--output-dir", help="dltrain's run directory (default: a temporary one)")
    ap.add_argument("--child", choices=["dltrain", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--argv", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = measure(args.recipe, args.profile, args.steps, args.overrides, Path(args.output_dir or tmp), args.rounds)
    cmp = compare(run, args.top)
    print(format_report(args.recipe, run, cmp))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, **run, **cmp}, indent=1) + "\n")


if __name__ == "__main__":
    main()
