"""What the harness measures itself, outside the training runs: FLOPs of one real training step,
the parameters' gradient bytes, the peak FLOP/s to compute MFU against.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts the matmuls and convolutions that one
forward + backward on a real micro-batch dispatches (element-wise ops are not counted, as in
every MFU convention). It runs in the harness process, on the CPU (on the GPU for a GPU suite,
where a large BERT batch would take tens of seconds on the host): counts do not depend on the
device or the precision. The batch is the workload's `flops_batch` (text: padded to
`data.max_length`, the length the analytic formula assumes), and where a workload counts tokens
(`tokens_of`) a second count on a real, dynamically padded batch, whose FLOPs per padded token
turn the run's padded tokens/s into achieved FLOP/s.

Peaks (the GPU table, the CPU matmul microbenchmark) live in dltrain.peaks, shared with the
training loop; they are imported here under their old names.
"""

from __future__ import annotations

import statistics

import torch

from dltrain.precision import DTYPES

# The data keys that set a sample's length (text: tokens; RNN: time steps); with the workload, the
# model section, the micro-batch and compile they decide what one step computes.
SHAPE_DATA_KEYS = ("max_length", "padding", "bucket_multiple", "seq_len")


def compute_shape(recipe, micro_batch: int | None) -> dict:
    """What one step computes, as a comparable dict: two runs with equal shapes do the same work per
    step whatever their entry names (the projection borrows a GPU run's step time only then)."""

    def dump(section):  # a plugin workload's recipe need not have every section
        return section.model_dump(mode="json") if section is not None else None

    data = dump(getattr(recipe, "data", None)) or {}
    return {
        "workload": recipe.workload,
        "micro_batch": micro_batch,
        "compile": dump(recipe.train.compile),
        "model": dump(getattr(recipe, "model", None)),
        **{k: data[k] for k in SHAPE_DATA_KEYS if k in data},
    }


def _count(model, workload, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        workload.forward(model, batch).loss.backward()
    return counter.get_total_flops()


def first_batch(recipe, data, batch_size: int):
    idx = torch.arange(min(batch_size, len(data.train)))
    return next(iter(data.train.batches([idx])))


def _quiet() -> None:
    """The harness prints one line per job; the libraries' progress bars would bury them."""
    try:  # the text libraries, where installed
        import datasets
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def measure_workload(recipe, micro_batch: int, device: str = "cpu") -> dict:
    """FLOPs per training sample counted on a real micro-batch, the analytic figure beside it,
    and the gradient bytes a data-parallel step all-reduces."""
    from dltrain.workload import get_workload

    _quiet()
    workload = get_workload(recipe.workload)
    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe).to(device)
    model.train()
    out = {
        "flops_per_sample_analytic": workload.flops_per_sample(recipe),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # DDP all-reduces gradients in the parameters' dtype (fp32 master weights under autocast).
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    }
    # The batch flops_per_sample describes (text: padded to data.max_length), to cross-check the
    # analytic count; by default the first training examples.
    data = None
    if workload.flops_batch is not None:
        batch = workload.flops_batch(recipe, device, micro_batch)
    else:
        data = workload.build_data(recipe, device)
        batch = first_batch(recipe, data, micro_batch)
    out["flops_per_sample_measured"] = _count(model, workload, batch) / workload.batch_size_of(batch)
    if workload.tokens_of is not None:
        # A real batch as training pads it: its FLOPs per padded token turn the run's padded
        # tokens/s into achieved FLOP/s.
        real = first_batch(recipe, data or workload.build_data(recipe, device), micro_batch)
        out["flops_per_padded_token_measured"] = _count(model, workload, real) / workload.tokens_of(real)
    out["flops_measured_over_analytic"] = out["flops_per_sample_measured"] / out["flops_per_sample_analytic"]
    return out


def profile_step(
    recipe, micro_batch: int, device: str = "cpu", steps: int = 8, warmup: int = 3, before_first_step=None, wrap=None
) -> dict:
    """Forward, backward and optimizer seconds of one training step on a real micro-batch (medians
    over `steps` after `warmup`), and when each gradient became ready, relative to the start of
    backward (a post-accumulate-grad hook per parameter): what dltrain.bench.perfmodel needs to
    place DDP's buckets in time. Runs in the harness process, at its thread count."""
    import time
    from contextlib import nullcontext

    from dltrain.optim import build_optimizer
    from dltrain.workload import get_workload

    _quiet()
    workload = get_workload(recipe.workload)
    torch.manual_seed(recipe.train.seed)
    model = workload.build_model(recipe).to(device).train()
    batch = first_batch(recipe, workload.build_data(recipe, device), micro_batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(recipe.optim, list(params.values()))
    cuda = device.startswith("cuda")
    stamp = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else time.perf_counter
    marks: dict[str, object] = {}
    for name, p in params.items():
        p.register_post_accumulate_grad_hook(lambda _, name=name: marks.__setitem__(name, _record(stamp)))
    run = wrap(model) if wrap is not None else model  # e.g. DDP: its hooks and bucket copies in the timings
    low = recipe.train.precision != "fp32"  # bf16 and fp16 run under autocast, fp32 as it is
    autocast = (
        (lambda: torch.autocast(device.split(":")[0], dtype=DTYPES[recipe.train.precision])) if low else nullcontext
    )
    phases, ready = [], {n: [] for n in params}
    if before_first_step is not None:
        before_first_step()
    for i in range(warmup + steps):
        marks.clear()
        t0 = _record(stamp)
        with autocast():
            loss = workload.forward(run, batch).loss
        t1 = _record(stamp)
        loss.backward()
        t2 = _record(stamp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = _record(stamp)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed = (lambda a, b: a.elapsed_time(b) / 1e3) if cuda else (lambda a, b: b - a)
            phases.append((elapsed(t0, t1), elapsed(t1, t2), elapsed(t2, t3)))
            for n, m in marks.items():
                ready[n].append(elapsed(t1, m))
    fwd, bwd, opt = (statistics.median(p[k] for p in phases) for k in range(3))
    grads = sorted(
        ([p.numel() * p.element_size(), statistics.median(ready[n])] for n, p in params.items() if ready[n]),
        key=lambda g: g[1],
    )
    return {
        "forward_s": fwd,
        "backward_s": bwd,
        "optimizer_s": opt,
        "grads": grads,
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "threads": torch.get_num_threads(),
        "device": device,
        "precision": recipe.train.precision,
    }


def _record(stamp):
    """A point in time: perf_counter seconds, or a CUDA event recorded on the current stream."""
    mark = stamp()
    if isinstance(mark, float):
        return mark
    mark.record()
    return mark


def measure_step(
    recipe,
    micro_batch: int,
    device: str = "cpu",
    threads: int | None = None,
    colocate: tuple[str, str | None, list[str], int] | None = None,
) -> dict:
    """profile_step at `threads` CPU threads (the suite's per-process count), with what the step
    model needs beside it: the per-device batch and DDP's bucket cap. With `colocate` (recipe
    path, profile, overrides, N) on a CPU, also the same profile in N processes at once: the
    compute of one rank when N ranks share this host's cores, caches and memory bandwidth, with
    the model inside DDP (a 1-process group: DDP's hooks and bucket copies, no peer to wait for)."""
    before = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        profile = profile_step(recipe, micro_batch, device, steps=PROFILE_STEPS)
    finally:
        torch.set_num_threads(before)
    dist = getattr(recipe, "distributed", None)
    profile["bucket_cap_mb"] = getattr(dist, "bucket_cap_mb", None)  # None: DDP's default
    if colocate and device == "cpu" and colocate[3] > 1:
        alone = profile["forward_s"] + profile["backward_s"] + profile["optimizer_s"]
        together = [
            p["forward_s"] + p["backward_s"] + p["optimizer_s"]
            for p in colocated_profiles(*colocate, micro_batch, threads or 1)
        ]
        profile["colocated"] = {str(colocate[3]): statistics.fmean(together) / alone}
    return {"micro_batch": micro_batch, "step_profile": profile}


PROFILE_STEPS = 20


def colocated_profiles(
    path: str, profile: str | None, overrides: list[str], n: int, micro_batch: int, threads: int
) -> list[dict]:
    """profile_step in n processes, each with its model in DDP on a group of its own, that wait
    for each other before their first step (a file barrier), so that their steps overlap."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from dltrain import shipped

    with tempfile.TemporaryDirectory() as barrier:
        argv = [
            sys.executable,
            "-m",
            "dltrain.bench.measure",
            path,
            "--micro",
            str(micro_batch),
            "--barrier",
            barrier,
            "--parties",
            str(n),
            *(["--profile", profile] if profile else []),
            *(a for s in overrides for a in ("--set", s)),
        ]
        root = os.pathsep.join(p for p in (str(shipped.import_root()), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": root}
        procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
            for _ in range(n)
        ]
        outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a co-located step profile failed (exit codes {[p.returncode for p in procs]})")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def _profile_main() -> None:
    """`python -m dltrain.bench.measure RECIPE ...`: one co-located profile, as JSON on stdout."""
    import argparse
    import json
    import os
    import time
    from pathlib import Path

    from dltrain.recipe import load_recipe

    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--profile")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--barrier", required=True)
    p.add_argument("--parties", type=int, required=True)
    args = p.parse_args()
    recipe = load_recipe(args.recipe, args.profile, args.set)

    def wait_for_all() -> None:  # called when this process's model and data are built
        (Path(args.barrier) / f"ready.{os.getpid()}").touch()
        while len(list(Path(args.barrier).glob("ready.*"))) < args.parties:
            time.sleep(0.005)

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cap = getattr(getattr(recipe, "distributed", None), "bucket_cap_mb", None)
    kwargs = {"bucket_cap_mb": cap} if cap not in (None, 25) else {}  # as Accelerate passes it
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(args.barrier) / 'store'}.{os.getpid()}", rank=0, world_size=1
    )
    try:
        out = profile_step(
            recipe,
            args.micro,
            "cpu",
            steps=PROFILE_STEPS,
            before_first_step=wait_for_all,
            wrap=lambda model: DistributedDataParallel(model, **kwargs),
        )
    finally:
        dist.destroy_process_group()
    print(json.dumps({k: out[k] for k in ("forward_s", "backward_s", "optimizer_s")}))


if __name__ == "__main__":
    _profile_main()
