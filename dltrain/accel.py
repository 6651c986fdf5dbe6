"""Build the Accelerator: devices, precision, gradient accumulation, DeepSpeed, trackers.

Also the batch arithmetic: a recipe gives the global batch; the per-device micro-batch and the
accumulation steps are derived here, in one place, from the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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
            f"train.micro_batch_size={micro} x train.grad_accum={accum} x world size {world} = {micro * accum * world}, "
            f"not train.global_batch_size={g}: drop one of them to have it derived"
        )
    return BatchPlan(g, micro, accum, world)


def launched_world_size() -> int:
    """The number of processes the launcher says it started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _use_deepspeed(recipe: RecipeBase) -> bool:
    if recipe.deepspeed is not None and recipe.deepspeed.zero_stage > 0:
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_precision(precision: str, device_type: str) -> None:
    # Accelerate silently runs fp16 in float32 on a CPU; refuse rather than report fake fp16 numbers.
    if precision == "fp16" and device_type != "cuda":
        raise RecipeError(
            f"train.precision=fp16 needs a CUDA GPU (this run is on {device_type}, where fp16 autocast "
            "is ignored): use --set train.precision=bf16 or fp32"
        )


def build_accelerator(recipe: RecipeBase, run_dir, *, with_trackers: bool = True):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.train.precision]
    device_type = "cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") else "cpu"
    check_precision(recipe.train.precision, device_type)
    world = launched_world_size()
    plan = plan_batches(recipe.train, world)
    kwargs = {}
    if device_type == "cpu" and world > 1:
        # gloo is the CPU backend; DeepSpeed on CPU needs it named explicitly (see ENV-NOTES).
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if _use_deepspeed(recipe):
        kwargs["deepspeed_plugin"] = build_deepspeed_plugin(recipe, plan)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=plan.grad_accum,
        log_with="wandb" if (with_trackers and recipe.tracking.wandb) else None,
        project_dir=str(run_dir),
        cpu=device_type == "cpu" and "deepspeed_plugin" not in kwargs,
        **kwargs,
    )
    check_world(accelerator, world)
    return accelerator, plan


def check_world(accelerator, launched: int) -> None:
    """Fail loudly when the launcher started N processes but each one sees a world of its own."""
    if accelerator.num_processes != launched:
        raise RecipeError(
            f"launched {launched} processes but this one sees a world of {accelerator.num_processes}: "
            "the processes are not connected (on a CPU use `dltrain launch --cpu --nproc N`)"
        )


def build_deepspeed_plugin(recipe: RecipeBase, plan: BatchPlan):
    from accelerate.utils import DeepSpeedPlugin

    ds = recipe.deepspeed
    stage = ds.zero_stage if ds is not None else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_clipping=recipe.train.clip_grad_norm or 0.0,
        offload_optimizer_device=ds.offload_optimizer if ds else "none",
        offload_param_device=ds.offload_params if ds else "none",
        zero3_save_16bit_model=True,  # lets get_state_dict gather ZeRO-3 shards for export
    )
    # Hand DeepSpeed the batch figures explicitly: its 'auto' values need a prepared DataLoader.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.micro_batch
    plugin.deepspeed_config["train_batch_size"] = plan.global_batch
    return plugin
