"""A data-parallel step, modelled: compute, then the communication DDP cannot hide behind backward.

    step(N) = step(1) + exposed gradient all-reduce + buffer broadcast + dltrain's own collectives

step(1) is the step measured at world size 1 (forward + backward + optimizer + everything else the
loop does). DDP all-reduces gradients in buckets: torch's own assignment
(`torch.distributed._compute_bucket_assignment_by_size`) over the parameters in the order their
gradients became ready, which is how DDP rebuilds its buckets after the first step; the caps are
DDP's: a first bucket of 1 MiB then 25 MiB when no bucket_cap_mb is given (Accelerate passes none
when it is its default, 25), else bucket_cap_mb for every bucket (torch's _BucketCapacityConfig). A bucket's all-reduce starts when its last gradient is
ready and the previous bucket's has finished (one communication stream), and takes
alpha + 2(N-1)/N x bytes / busbw (dltrain.bench.comm's fits). Whatever runs past the end of
backward is exposed: the last buckets (often the embeddings, ready last) cannot overlap anything.

Per step, dltrain itself all-reduces one scalar when N > 1 (the sum of the losses, so that every
rank takes the same decision on a non-finite loss); DDP broadcasts the module's buffers from rank 0
before each forward when the model has any. Both are charged in full.

When gradients become ready comes from dltrain.bench.measure.profile_step: a hook on each
parameter times the moment its gradient is accumulated, relative to the start of backward.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DEFAULT_BUCKET_CAP_MB = 25
LOSS_REDUCE_BYTES = 4  # the float32 loss sum dltrain all-reduces once per step


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    ready_s: float  # into backward, when its last gradient is ready


def ddp_buckets(grads: list[tuple[int, float]], bucket_cap_mb: float | None = None) -> list[Bucket]:
    """Buckets as DDP forms them from (bytes, ready seconds) per float32 gradient; `grads` in any
    order (they are sorted by readiness, the order DDP rebuilds its buckets in). bucket_cap_mb:
    None (or 25) for DDP's default."""
    import torch
    import torch.distributed as dist

    default = bucket_cap_mb is None or bucket_cap_mb == DEFAULT_BUCKET_CAP_MB
    cap = int((bucket_cap_mb or DEFAULT_BUCKET_CAP_MB) * 2**20)
    order = sorted(grads, key=lambda g: g[1])
    tensors = [torch.empty(max(1, nbytes // 4), device="meta") for nbytes, _ in order]
    groups, _ = dist._compute_bucket_assignment_by_size(tensors, [FIRST_BUCKET_BYTES if default else cap, cap],
                                                       [False] * len(tensors))
    buckets = [Bucket(sum(order[i][0] for i in g), max(order[i][1] for i in g)) for g in groups]
    return sorted(buckets, key=lambda b: b.ready_s)


def overlap(buckets: list[Bucket], backward_s: float, cost) -> dict:
    """Serial communication of the buckets from their ready times; `cost(bytes)` in seconds.
    Returns the total communication time, when it ends and what of it is exposed past backward."""
    end, total = 0.0, 0.0
    for b in buckets:
        t = cost(b.nbytes)
        end = max(end, b.ready_s) + t
        total += t
    return {"comm_s": total, "comm_end_s": end, "exposed_s": max(0.0, end - backward_s)}


def predict_step(step1_s: float, profile: dict, comm, bucket_cap_mb: float | None = None) -> dict:
    """The step time at comm.world_size from the world-size-1 step and the profile of one step
    (backward_s, grads [(bytes, ready_s)], buffer_bytes); `comm` is a dltrain.bench.comm.CommModel."""
    if comm.world_size == 1:
        return {"step_s": step1_s, "exposed_s": 0.0, "comm_s": 0.0, "buffers_s": 0.0, "own_s": 0.0, "buckets": 0}
    buckets = ddp_buckets([tuple(g) for g in profile["grads"]], bucket_cap_mb)
    ov = overlap(buckets, profile["backward_s"], lambda nbytes: comm.time("all_reduce", nbytes))
    buffers = comm.time("broadcast", profile["buffer_bytes"]) if profile.get("buffer_bytes") else 0.0
    own = comm.time("all_reduce", LOSS_REDUCE_BYTES)
    return {"step_s": step1_s + ov["exposed_s"] + buffers + own, "exposed_s": ov["exposed_s"], "comm_s": ov["comm_s"],
            "buffers_s": buffers, "own_s": own, "buckets": len(buckets)}
