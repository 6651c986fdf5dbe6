"""Honest clocks: wall-clock windows of consecutive steps, steady-state throughput, memory."""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_mark(cuda: bool):
    """A point in time that never waits for the device: a recorded CUDA event, or the host clock
    on a CPU (where the host waits for every op anyway)."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


class StepClock:
    """One wall clock over windows of consecutive optimizer steps.

    A window runs from one edge to the next (the end of the warm-up, each train log record, the
    end of training); everything the loop does per step falls inside it: data, forward,
    backward, optimizer, logging, the progress bar, signal checks, collectives, host reads. The
    device is synchronized at the edges only. Evaluation and checkpoint writes are the only
    work taken out, each timed itself (`excluded`). The first `warmup` steps (compilation,
    allocator and cache warm-up) stay out of the steady-state figures.

    Step-time percentiles come from the same clock: per-step host times on a CPU (where the host
    waits for every op anyway), per-step CUDA events on a GPU, resolved at the window's edge.
    """

    def __init__(self, device: torch.device, warmup: int, samples_per_step: int, start_step: int = 0):
        self.device, self.warmup, self.samples_per_step = device, warmup, samples_per_step
        self.cuda = device.type == "cuda"
        self.excluded_s = {"eval_s": 0.0, "checkpoint_s": 0.0}
        self.step_times_s: list[float] = []  # steady-state steps only
        self.steady_s = 0.0  # wall time of the steady windows, exclusions taken out
        self.steady_steps = 0
        self.data_wait_s = 0.0
        self.first_step = start_step
        synchronize(device)
        self.t_begin = time.perf_counter()
        self._open(start_step)

    def _open(self, step: int) -> None:
        self.edge_step = step
        self.edge_t = time.perf_counter()
        self.window_excluded = 0.0
        self._prev = step_mark(self.cuda)
        self._intervals: list = []  # (start mark, end mark) of each step in the window

    def step_done(self, step: int) -> None:
        """The end of optimizer step `step` (1-based); the warm-up's last step closes its window."""
        end = step_mark(self.cuda)
        self._intervals.append((self._prev, end))
        self._prev = end
        if step == self.warmup and self.edge_step < self.warmup:
            self.close(step)

    def add_data_wait(self, seconds: float) -> None:
        if self.edge_step >= self.warmup:
            self.data_wait_s += seconds

    @contextmanager
    def excluded(self, what: str):
        """Time `what` (eval_s, checkpoint_s) and take it out of the window and of the steps."""
        synchronize(self.device)  # the steps queued before it are not its cost
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            dt = time.perf_counter() - t0
            self.excluded_s[what] += dt
            self.window_excluded += dt
            self._prev = step_mark(self.cuda)  # the next step's own time starts after it

    # -- windows ------------------------------------------------------------------------------

    def close(self, step: int) -> dict:
        """Close the window at the end of `step` and open the next; returns the window's figures
        (steps, seconds, samples/s), an empty dict when it holds no step."""
        synchronize(self.device)
        now = time.perf_counter()
        steps = step - self.edge_step
        seconds = now - self.edge_t - self.window_excluded
        times = self._step_seconds()
        steady = self.edge_step >= self.warmup
        if steady and steps > 0:
            self.steady_s += seconds
            self.steady_steps += steps
            self.step_times_s.extend(times)
        self._open(step)
        if steps <= 0 or seconds <= 0:
            return {}
        return {
            "steps": steps,
            "seconds": seconds,
            "samples_per_s": self.samples_per_step * steps / seconds,
            "steady": steady,
        }

    def _step_seconds(self) -> list[float]:
        if self.cuda:  # the device is synchronized: every event has completed
            return [start.elapsed_time(end) / 1e3 for start, end in self._intervals]
        return [end - start for start, end in self._intervals]

    def summary(self, step: int) -> dict[str, float]:
        """Steady-state figures, and the cross-check: samples trained / (training wall time minus
        evaluation and checkpoint writes), warm-up included, beside the steady windows' rate."""
        synchronize(self.device)
        wall = time.perf_counter() - self.t_begin
        busy = wall - sum(self.excluded_s.values())
        # train_s: first batch to the end of the last step, evaluation and checkpoints taken out
        # (the time-to-accuracy records' training clock; dltrain.bench.records)
        out = {"train_wall_s": wall, "train_s": busy, **self.excluded_s, "steady_steps": self.steady_steps}
        trained = step - self.first_step
        if trained > 0 and busy > 0:
            out["overall_samples_per_s"] = self.samples_per_step * trained / busy
        times = self.step_times_s
        if not self.steady_steps or not times:
            return out
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        out |= {
            "train_samples_per_s": self.samples_per_step * self.steady_steps / self.steady_s,
            "step_time_ms_p50": 1e3 * statistics.median(times),
            "step_time_ms_p90": 1e3 * q[8],
            # p1..p99: the step model takes the 0.5^(1/N) quantile as the median of N ranks' slowest
            "step_time_ms_percentiles": [1e3 * t for t in statistics.quantiles(times, n=100)]
            if len(times) >= 2
            else None,
            "data_wait_share": self.data_wait_s / self.steady_s,
        }
        if "overall_samples_per_s" in out:
            out["clock_agreement"] = out["train_samples_per_s"] / out["overall_samples_per_s"]
        return out


def add_train_stats(window: dict, loss: torch.Tensor, stats: dict[str, torch.Tensor], n: int) -> None:
    """Per micro-batch: its mean loss (the one backpropagated, detached) and one float64 sum per
    other statistic, as device tensors; reduced only when a record is logged. Each is a copy of its
    own, never a view of the step's output: under CUDA graphs (compile mode reduce-overhead) the
    next replay overwrites that memory, and a kept alias would crash or log later steps' values.
    (.double() of another dtype is that copy, at half the cost of .to(float64, copy=True).)"""
    window.setdefault("loss", []).append(loss.clone() if loss.dtype == torch.float64 else loss.double())
    window.setdefault("n", []).append(n)
    for key, per_example in stats.items():
        if key != "loss":
            window.setdefault(key, []).append(per_example.detach().sum(dtype=torch.float64))


def window_sums(window: dict) -> dict[str, torch.Tensor]:
    losses = torch.stack(window["loss"]).double()
    n = torch.tensor(window["n"], dtype=torch.float64, device=losses.device)
    sums = {k: torch.stack(v).sum() for k, v in window.items() if k not in ("loss", "n")}
    return sums | {"loss": (losses * n).sum(), "count": n.sum()}


def window_flops(workload, recipe, totals: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of a window: the workload's own count from its statistics where it has one
    (text: a padded and a real-token basis), else its analytic FLOPs per sample."""
    if workload.flops_of is not None:
        return workload.flops_of(recipe, totals)
    return {"flops": workload.flops_per_sample(recipe) * totals["count"]}


def rates(sums: dict[str, float], samples_per_s: float, peak_flops: float | None, world: int) -> dict[str, float]:
    """tokens/s, FLOP/s and MFU: per-sample averages of `sums` (count, tokens, padded_tokens,
    flops[_real]) times samples/s; MFU against `peak_flops` per process x `world`."""
    count = sums.get("count")
    if not count or not samples_per_s:
        return {}
    out = {f"{key}_per_s": sums[key] / count * samples_per_s for key in ("tokens", "padded_tokens") if key in sums}
    for basis in [k for k in sums if k.startswith("flops")]:
        suffix = basis[len("flops") :]  # "" (as computed, padding included) or "_real"
        out[f"flops_per_s{suffix}"] = sums[basis] / count * samples_per_s
        if peak_flops:
            out[f"mfu{suffix}"] = out[f"flops_per_s{suffix}"] / (peak_flops * world)
    return out


def throughput_record(
    workload, recipe, totals: dict[str, float], tick: dict, peak_flops: float | None, world: int, steady: dict
) -> dict[str, float]:
    """A train record's rates: samples/s from the clock's window (`tick`), the others from the
    summed statistics of the same steps (`totals`). Steady windows are also added up in `steady`,
    whose rates (`rates(steady, ...)`) the run's summary reports."""
    sums = {k: totals[k] for k in ("count", "tokens", "padded_tokens") if k in totals}
    if sums.get("count"):
        sums |= window_flops(workload, recipe, totals)
    if tick["steady"]:
        for key, value in sums.items():
            steady[key] = steady.get(key, 0.0) + value
    out = {"samples_per_s": tick["samples_per_s"], **rates(sums, tick["samples_per_s"], peak_flops, world)}
    return {f"train/{k}": v for k, v in out.items()}


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    out = {"cpu_peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to the process's own address
    space; ru_maxrss is not enough there: a process forked by a large one and then exec'd keeps
    the parent's figure (every run started by `dltrain bench` reported the harness's 1.7 GB)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
