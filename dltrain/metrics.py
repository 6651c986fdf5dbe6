"""Honest clocks: per-step times with the device synchronized, steady-state throughput, memory."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times optimizer steps. The first `warmup` steps, and anything between `pause()` and the next
    `start()` (evaluation, checkpointing), stay out of the throughput figures."""

    def __init__(self, device: torch.device, warmup: int, samples_per_step: int):
        self.device, self.warmup, self.samples_per_step = device, warmup, samples_per_step
        self.step_times_s: list[float] = []  # steady-state steps only
        self.data_wait_s = 0.0  # time spent fetching batches during steady-state steps
        self.seen = 0
        self._t0: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def add_data_wait(self, seconds: float) -> None:
        if self.seen >= self.warmup:
            self.data_wait_s += seconds

    def stop(self) -> float:
        """End of an optimizer step; returns its duration and restarts the clock."""
        synchronize(self.device)
        now = time.perf_counter()
        dt = now - (self._t0 if self._t0 is not None else now)
        if self.seen >= self.warmup:
            self.step_times_s.append(dt)
        self.seen += 1
        self._t0 = now
        return dt

    def pause(self) -> None:
        self._t0 = None

    def summary(self) -> dict[str, float]:
        times = self.step_times_s
        if not times:
            return {"steady_steps": 0}
        total = sum(times)
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {
            "steady_steps": len(times),
            "train_samples_per_s": self.samples_per_step * len(times) / total,
            "step_time_ms_p50": 1e3 * statistics.median(times),
            "step_time_ms_p90": 1e3 * q[8],
            "data_wait_share": self.data_wait_s / total,
        }


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
