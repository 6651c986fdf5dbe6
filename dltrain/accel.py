"""Build the Accelerator: device, precision, gradient accumulation, trackers, the process group,
and what the recipe's strategy asks of it (dltrain.strategy).

Also the batch arithmetic: a recipe gives the global batch; the per-device micro-batch and the
accumulation steps are derived here, in one place, from the world size.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from dltrain.launched import check_launch
from dltrain.recipe import RecipeBase, RecipeError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int  # per device, per forward
    grad_accum: int
    world: int


def plan_batches(train, world: int) -> BatchPlan:
    """global = micro x accum x world; derive whichever of micro and accum is not given."""
    g, micro, accum = train.global_batch_size, train.micro_batch_size, train.grad_accum
    if micro is None and accum is None:
        accum = 1
    if micro is None:
        micro, rem = divmod(g, world * accum)
        if rem or micro == 0:
            raise RecipeError(
                f"train.global_batch_size={g} is not divisible by world size {world} x train.grad_accum={accum}: "
                "change the global batch or set train.micro_batch_size"
            )
    elif accum is None:
        accum, rem = divmod(g, world * micro)
        if rem or accum == 0:
            raise RecipeError(
                f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={micro} x world size {world}"
            )
    elif micro * accum * world != g:
        raise RecipeError(
            f"train.micro_batch_size={micro} x train.grad_accum={accum} x world size {world} = "
            f"{micro * accum * world}, "
            f"not train.global_batch_size={g}: drop one of them to have it derived"
        )
    return BatchPlan(g, micro, accum, world)


def launched_world_size() -> int:
    """The number of processes the launcher says it started (1 when run directly)."""
    # The variables Accelerate itself reads: torchrun/accelerate set WORLD_SIZE, MPI launchers the others.
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def dist_timeout() -> timedelta:
    """How long a collective waits for a silent peer before the job fails (a crashed peer is seen
    at once by gloo/NCCL; this bounds a hung one). DLTRAIN_DIST_TIMEOUT_S overrides the 15 minutes,
    which must cover the longest rank-0-only pause (final export, plots) while others wait."""
    return timedelta(seconds=float(os.environ.get("DLTRAIN_DIST_TIMEOUT_S", "900")))


def build_accelerator(recipe: RecipeBase, run_dir, *, with_trackers: bool = True):
    """The Accelerator for this process, with what the recipe's strategy asks of it
    (dltrain.strategy), after refusing a combination that cannot run here."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from dltrain import strategy

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    world = launched_world_size()
    device_type = (
        "cuda"
        if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        else "cpu"
    )
    check_launch(world, torch.cuda.device_count())  # the world the launcher was asked for, before any collective
    backend = strategy.check(recipe, world, device_type)
    plan = plan_batches(recipe.train, world)
    trackers = list(recipe.tracking.trackers) if with_trackers else []
    if trackers:
        from dltrain.tracking import check_trackers

        check_trackers(trackers)
    warn_launcher_overrides(recipe, precision)
    kwargs = backend.accelerator_kwargs(recipe, plan, world, device_type)
    if world > 1:
        # gloo is the CPU backend; DeepSpeed on a CPU needs it named, or its batch check fails.
        named = {"backend": "gloo"} if device_type == "cpu" else {}
        kwargs["kwargs_handlers"] = [
            InitProcessGroupKwargs(timeout=dist_timeout(), **named),
            *kwargs.get("kwargs_handlers", []),
        ]
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=plan.grad_accum,
        log_with=trackers or None,
        # A placeholder until the run directory is chosen (set_directories): TensorBoard's tracker
        # needs some logging_dir when the Accelerator is built.
        project_dir=str(run_dir),
        # Accelerate drops a DeepSpeed plugin silently when told cpu=True.
        cpu=device_type == "cpu" and "deepspeed_plugin" not in kwargs,
        **kwargs,
    )
    check_world(accelerator, world)
    return accelerator, plan


def warn_launcher_overrides(recipe: RecipeBase, precision: str) -> None:
    """One line (rank 0) when the launcher asked for another precision than the recipe's: the recipe
    wins (Accelerator() is given it), e.g. over an Accelerate config's mixed_precision."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", precision) and os.environ.get("RANK", "0") == "0":
        # "no" is what `dltrain launch` passes itself (and Accelerate's default): not a user's choice.
        print(
            f"dltrain: warning: the recipe's train.precision={recipe.train.precision} overrides the launcher's "
            f"mixed_precision={launcher} (set train.precision to change it)",
            file=sys.stderr,
            flush=True,
        )


def check_world(accelerator, launched: int) -> None:
    """Fail loudly when the launcher started N processes but each one sees a world of its own."""
    if accelerator.num_processes != launched:
        raise RecipeError(
            f"launched {launched} processes but this one sees a world of {accelerator.num_processes}: "
            "the processes are not connected (on a CPU use `dltrain launch --cpu --nproc N`)"
        )


def rendezvous_error(exc: Exception) -> str:
    """One line for a process group that cannot open or reach its rendezvous (e.g. a busy port)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if "EADDRINUSE" in reason or "address already in use" in reason:
        reason = "the port is already in use by another process"
    return (
        f"cannot open the rendezvous at {where} ({reason[:160]}): pick a free port (MASTER_PORT, or --master ADDR:PORT)"
    )
