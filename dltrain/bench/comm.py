"""`dltrain bench comm`: time the collectives data-parallel training uses, and fit the alpha-beta model.

Each of N processes (torchrun, gloo on CPUs, NCCL on GPUs; on one node, or on several with
`--nnodes`, `--node-rank` and `--master` as `dltrain launch` takes them) runs all-reduce, all-gather,
reduce-scatter and broadcast over float32 buffers from 4 KiB to 512 MiB. On a GPU, calls are
timed in groups of up to GROUP back to back between two CUDA events, as nccl-tests times its
iterations: an event recorded before one Python call would put that call's host overhead (the
Python wrapper, the launch) in a small message's latency; back to back, the device runs call k
while the host launches call k+1. On a CPU the host clock brackets each (synchronous) gloo call
alone (group_for says why). A size's time is the slowest rank's median over the groups'
per-call times (at least 5 groups, about `target_s` in all), after two untimed calls; their mean
is kept beside it. Bandwidths use the nccl-tests definitions (its doc/PERFORMANCE.md):
`size` is the whole buffer (all-gather: the gathered output; reduce-scatter: the input), algorithm
bandwidth algbw = size / time, bus bandwidth busbw = algbw x 2(N-1)/N for all-reduce,
x (N-1)/N for all-gather and reduce-scatter, x 1 for broadcast: busbw is what each link carries,
comparable across world sizes and with the hardware's link speed.

The alpha-beta model of one collective: time(size) = alpha + factor x size / busbw, alpha the
latency, busbw the bandwidth. It is fitted by least squares per size range (latency-bound small
messages, a middle range, bandwidth-bound large ones), since one line fits neither end well; the
fit's largest relative miss per range is reported beside it. dltrain.bench.perfmodel predicts a
training step's exposed communication from these fits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dltrain.bench.perfmodel import KiB, MiB, bus_factor, fit_alpha_beta

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def sizes_between(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi bytes (both rounded to a power of two)."""
    out, size = [], 1 << max(0, (lo - 1).bit_length())
    while size <= hi:
        out.append(size)
        size *= 2
    return out


def parse_size(text: str) -> int:
    """'4K', '512M', '1G' or a number of bytes."""
    units = {"K": KiB, "M": MiB, "G": 2**30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        size = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):  # 'abc'; 'infK' (float inf has no int)
        size = -1
    if not 0 < size <= 2**40:
        from dltrain.recipe import RecipeError

        raise RecipeError(
            f"message size {text!r}: give bytes or a number with K, M or G, from 1 byte to 1T (e.g. 4K, 512M)"
        ) from None
    return size


# ----------------------------------------------------------------------------------------------
# The worker: one per process, under torchrun


def _call(op: str, size: int, world: int, device):
    """A closure running `op` once over buffers allocated here, `size` bytes in nccl-tests' sense."""
    import torch
    import torch.distributed as dist

    numel = max(world, size // 4 // world * world)  # float32, divisible into world equal shards
    if op == "all_reduce":
        buf = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(buf)
    if op == "all_gather":
        out, shard = torch.empty(numel, device=device), torch.ones(numel // world, device=device)
        return lambda: dist.all_gather_into_tensor(out, shard)
    if op == "reduce_scatter":
        inp, shard = torch.ones(numel, device=device), torch.empty(numel // world, device=device)
        return lambda: dist.reduce_scatter_tensor(shard, inp)
    buf = torch.ones(numel, device=device)
    return lambda: dist.broadcast(buf, 0)


def _slowest(seconds: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


GROUP = 10  # calls back to back between two CUDA events (fewer when a size allows fewer calls)
MIN_GROUPS = 5  # groups per size at least: the median needs a few


def group_for(device) -> int:
    """Calls per timed group. A GPU collective is asynchronous: back to back, the device runs one
    call while the host launches the next, so a group's time is the collectives' own. On a CPU
    (gloo) each call returns when it is done and the host clock brackets it alone; grouping would
    only let a descheduled peer's stall land in most groups on a shared host, where the median
    over single calls steps around it."""
    return GROUP if device.type == "cuda" else 1


def _mark(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream, or the host clock."""
    import torch

    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start, end, cuda: bool) -> float:
    return start.elapsed_time(end) / 1e3 if cuda else end - start


def time_op(call, device, target_s: float, group: int | None = None) -> tuple[float, float, int]:
    """(median, mean) seconds per call and the calls timed. Groups of `group` calls run back to
    back between two marks (events read after the last group); a group's time over `group` is one
    sample, and the slowest rank's statistic over the samples is kept. The median is what a
    training step meets typically, and what the step model uses: on a shared or virtualized host a
    few calls take milliseconds (a descheduled peer), which the mean spreads over all of them; the
    mean is kept beside it."""
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(2):  # untimed: first-use allocations and connection set-up
        call()
    sync()
    estimate = _slowest((time.perf_counter() - t0) / 2, device)  # every rank must choose the same count
    calls = int(min(1000, max(MIN_GROUPS, target_s / max(estimate, 1e-7))))
    group = max(1, min(group or group_for(device), calls // MIN_GROUPS))
    dist.barrier()
    marks = [_mark(cuda)]
    for _ in range(calls // group):
        for _ in range(group):
            call()
        marks.append(_mark(cuda))
    sync()
    times = [_seconds(a, b, cuda) / group for a, b in zip(marks, marks[1:])]
    return _slowest(statistics.median(times), device), _slowest(statistics.fmean(times), device), len(times) * group


def worker(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="python -m dltrain.bench.comm")
    p.add_argument("--out", required=True)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--min-bytes", type=int, default=4 * KiB)
    p.add_argument("--max-bytes", type=int, default=512 * MiB)
    p.add_argument("--target-s", type=float, default=0.2)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cuda else "cpu", torch.cuda.current_device() if cuda else None)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    try:
        for op in args.ops.split(","):
            for size in sizes_between(args.min_bytes, args.max_bytes):
                seconds, mean, calls = time_op(_call(op, size, world, device), device, args.target_s)
                algbw = size / seconds
                rows.append(
                    {
                        "op": op,
                        "bytes": size,
                        "world_size": world,
                        "backend": dist.get_backend(),
                        "device": device.type,
                        "dtype": "float32",
                        "calls": calls,
                        "time_us": seconds * 1e6,
                        "mean_us": mean * 1e6,
                        "algbw_GBps": algbw / 1e9,
                        "busbw_GBps": algbw * bus_factor(op, world) / 1e9,
                    }
                )
                if rank == 0:
                    print(
                        f"  {op:15s} {size / KiB:>10,.0f} KiB {seconds * 1e6:>12,.1f} us "
                        f"busbw {rows[-1]['busbw_GBps']:7.3f} GB/s ({calls} calls)",
                        flush=True,
                    )
                torch.cuda.empty_cache() if cuda else None
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


# ----------------------------------------------------------------------------------------------
# The driver: `dltrain bench comm`


def check_options(nproc: int, nnodes: int, node_rank: int, master: str | None, cpu: bool) -> None:
    """The process layout, refused in one line (RecipeError) before anything starts: at least two
    processes in all, no more on this node than it has devices (its GPUs; on a CPU, its cores: more
    processes time-slice the cores and time the scheduler, not the links), and the node options
    `dltrain launch` checks."""
    import torch

    from dltrain.launch import LaunchError, parse_master
    from dltrain.recipe import RecipeError

    if nproc < 1 or nproc * nnodes < 2:
        raise RecipeError(f"--nproc {nproc}: a collective needs at least 2 processes")
    devices = (os.cpu_count() or 1) if cpu else torch.cuda.device_count()
    if nproc > devices:
        what = f"{devices} CPU cores" if cpu else f"{devices} visible GPU(s)"
        raise RecipeError(
            f"--nproc {nproc}: this node has {what}, one process each: give --nproc {devices} or fewer "
            "(and --nnodes for more)"
        )
    if not 0 <= node_rank < nnodes:
        raise RecipeError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}")
    if nnodes > 1:
        if not master:
            raise RecipeError("several nodes need --master ADDR:PORT (the address of node 0, the same on every node)")
        try:
            if parse_master(master)[1] == 0:
                raise LaunchError(f"--master {master}: port 0 cannot be found by the other nodes: give a port")
        except LaunchError as exc:
            raise RecipeError(str(exc)) from None


def run_comm(
    out_dir: Path,
    nproc: int = 2,
    ops: tuple[str, ...] = OPS,
    min_bytes: int = 4 * KiB,
    max_bytes: int = 512 * MiB,
    cpu: bool | None = None,
    target_s: float = 0.2,
    nnodes: int = 1,
    node_rank: int = 0,
    master: str | None = None,
) -> dict | None:
    """Launch this node's workers, fit, write comm.jsonl (one row per op and size) and comm.json
    (fits). On several nodes every node runs this with its own node_rank; node 0 writes the
    results and returns them, the others return None."""
    import torch

    from dltrain.recipe import RecipeError

    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        raise RecipeError(f"--ops {','.join(ops)}: choose from {', '.join(OPS)}")
    if not 0 < min_bytes <= max_bytes:
        raise RecipeError(f"message sizes {min_bytes}..{max_bytes} bytes: give 0 < --min-bytes <= --max-bytes")
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    check_options(nproc, nnodes, node_rank, master, cpu)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "comm.jsonl"
    if nnodes == 1:
        layout = ["--standalone"]
    else:  # torchrun's static rendezvous at node 0, as `dltrain launch` starts several nodes
        from dltrain.launch import parse_master

        host, port = parse_master(master)
        layout = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port}"]
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *layout,
        f"--nproc_per_node={nproc}",
        "-m",
        "dltrain.bench.comm",
        "--out",
        str(rows_path),
        "--ops",
        ",".join(ops),
        "--min-bytes",
        str(min_bytes),
        "--max-bytes",
        str(max_bytes),
        "--target-s",
        str(target_s),
    ]
    from dltrain import shipped

    path = os.pathsep.join(p for p in (str(shipped.import_root()), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    nodes = f" x {nnodes} nodes (this is node {node_rank})" if nnodes > 1 else ""
    print(
        f"dltrain bench comm: {nproc} processes{nodes}, {'gloo (CPU)' if cpu else 'NCCL'}, {', '.join(ops)}, "
        f"{min_bytes / KiB:,.0f} KiB .. {max_bytes / MiB:,.0f} MiB",
        flush=True,
    )
    rc = subprocess.run(argv, env=env).returncode
    if rc == 0 and node_rank > 0:
        return None  # global rank 0, on node 0, wrote the rows
    if rc != 0 or not rows_path.is_file():
        raise RecipeError(f"the communication benchmark failed (exit code {rc}); its output is above")
    rows = [json.loads(ln) for ln in rows_path.read_text().splitlines() if ln.strip()]
    fits = fit_alpha_beta(rows)
    result = {
        "world_size": nproc * nnodes,
        "nnodes": nnodes,
        "backend": rows[0]["backend"],
        "device": rows[0]["device"],
        "fits": [f.__dict__ for f in fits],
        "rows": rows,
        "environment": _environment(),
    }
    (out_dir / "comm.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_for_suite(section, out_dir: Path, cpu: bool) -> None:
    """A suite's `comm:` section: one measurement per world size under out_dir/w<N>. A failure is
    printed and leaves that world size without fits (the report says so); the jobs still run."""
    from dltrain.recipe import RecipeError

    for n in section.world_sizes:
        try:
            run_comm(
                out_dir / f"w{n}",
                n,
                tuple(section.ops),
                parse_size(section.min_bytes),
                parse_size(section.max_bytes),
                cpu=cpu,
                target_s=section.target_s,
            )
        except RecipeError as exc:
            print(f"dltrain bench comm: world size {n}: {exc}", file=sys.stderr, flush=True)


def _environment() -> dict:
    import platform

    import torch

    return {
        "host": platform.node(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


if __name__ == "__main__":
    sys.exit(worker())
