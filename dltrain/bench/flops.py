"""The harness's FLOP figures (the measure stage, around the runs): each entry's FLOPs counted once
in the harness (dltrain.bench.measure), the CPU's peak sampled before and after every job, and from
both each Result's achieved FLOP/s and MFU.
"""

from __future__ import annotations

import os
import sys

from dltrain.bench.measure import compute_shape, measure_step, measure_workload
from dltrain.bench.result import Result
from dltrain.bench.suite import Job, Suite, entry_recipe
from dltrain.peaks import cpu_peak, gpu_peak, peak_rate


def add_flops(result: Result, measured: dict | None, cpu_peaks: dict[str, float]) -> None:
    """Achieved FLOP/s and MFU of `result` from its throughput and the harness's FLOP count."""
    sps = result.samples_per_s
    if not measured or not sps:
        return
    result.flops = measured
    if not 0.5 <= measured["flops_measured_over_analytic"] <= 2:
        # The counter misses ops without a FLOP formula (e.g. the fused LSTM kernels): trust the
        # analytic count then, and say so.
        result.flops_source = "analytic (FlopCounterMode saw {:.0%} of it)".format(
            measured["flops_measured_over_analytic"]
        )
        result.achieved_flops_per_s = measured["flops_per_sample_analytic"] * sps
        result.flops_basis = "samples, analytic FLOPs"
    elif "flops_per_padded_token_measured" in measured:
        if not result.padded_tokens_per_s:
            return  # text without token counts (the baseline scripts): FLOPs per sample unknown
        result.achieved_flops_per_s = measured["flops_per_padded_token_measured"] * result.padded_tokens_per_s
        # The work done, padding included: higher than a padding-free run's MFU, and the report says so.
        result.flops_basis = "padded tokens"
    else:
        result.achieved_flops_per_s = measured["flops_per_sample_measured"] * sps
        result.flops_basis = "samples"
    env = result.environment or {}
    if env.get("device") == "cuda":
        per_device = gpu_peak(env.get("gpu", ""), result.precision, result.tf32)
        if per_device is None:
            return  # unknown GPU or a MIG slice: no MFU rather than a wrong one
        rate = peak_rate(result.precision, result.tf32)
        result.peak_flops_per_s = per_device * result.world_size
        result.peak_source = f"datasheet {env.get('gpu')} {rate} x {result.world_size}"
    elif result.precision in cpu_peaks:
        threads = result.cpu_threads
        procs = result.world_size // result.nnodes if threads else 1
        where = f"{threads} thread(s) x {procs} process(es)" if threads else "all cores of this host"
        result.peak_procs = procs
        result.peak_flops_per_s = cpu_peaks[result.precision] * procs
        result.peak_source = f"measured (CPU matmul, {where})"
    else:
        return
    result.mfu = result.achieved_flops_per_s / result.peak_flops_per_s


def measure_entries(suite: Suite, jobs: list[Job]) -> dict[str, dict]:
    """FLOPs per entry, counted once per distinct recipe (entries that differ only in their axes,
    e.g. a compiled and an eager entry of one recipe, share a count). On a GPU suite the count runs
    on the GPU: bert-base at a large batch takes tens of seconds on a CPU."""
    import torch

    device = "cuda" if suite.device == "gpu" and torch.cuda.is_available() else "cpu"
    out, counted = {}, {}
    for entry in suite.entries:
        if not any(j.entry is entry for j in jobs):
            continue
        key = (entry.recipe, entry.profile, tuple(entry.overrides))
        if key not in counted:
            recipe = entry_recipe(entry)
            micro = recipe.train.micro_batch_size or recipe.train.global_batch_size // (recipe.train.grad_accum or 1)
            try:
                counted[key] = measure_workload(recipe, micro, device)
                # forward/backward/optimizer and gradient readiness, for the step model (dltrain.bench.scaling);
                # with a comm section (the model's check), on a CPU also with as many processes at once as
                # the entry's jobs put on one node: only that check uses it
                per_node = max(j.world // j.nnodes for j in jobs if j.entry is entry)
                colocate = (entry.recipe, entry.profile, list(entry.overrides), per_node) if suite.comm else None
                counted[key] |= measure_step(
                    recipe, micro, device, suite.cpu_threads if device == "cpu" else None, colocate=colocate
                )
            except Exception as exc:  # a workload whose data is missing fails its jobs, not the harness
                print(f"dltrain bench: FLOP count for '{entry.name}' failed: {exc}", file=sys.stderr)
                counted[key] = None
        if counted[key] is not None:
            # its first dltrain job's shape (compile is a job axis): what a GPU row must match to lend it its step time
            job = next((j for j in jobs if j.entry is entry and j.kind == "dltrain"), None)
            out[entry.name] = counted[key] | (
                {"shape": compute_shape(job.recipe, counted[key]["micro_batch"])} if job else {}
            )
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_cpu_peaks(suite: Suite, jobs: list[Job], seconds: float = 1.5) -> dict[str, float]:
    if suite.device != "cpu":
        return {}
    import torch

    # With cpu_threads, each process has that many threads: the peak of one such process, times
    # the processes of a job. Without, the job's processes share all cores: the host's peak.
    before = torch.get_num_threads()
    torch.set_num_threads(suite.cpu_threads or os.cpu_count() or 1)
    try:
        return {p: cpu_peak(p, seconds=seconds) for p in sorted({j.precision for j in jobs} & {"fp32", "bf16"})}
    finally:
        torch.set_num_threads(before)
