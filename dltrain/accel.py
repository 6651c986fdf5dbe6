"""Build the Accelerator: devices, precision, gradient accumulation, DDP settings, FSDP and
DeepSpeed plugins, trackers.

Also the batch arithmetic: a recipe gives the global batch; the per-device micro-batch and the
accumulation steps are derived here, in one place, from the world size.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

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


def _use_deepspeed(recipe: RecipeBase) -> bool:
    if recipe.deepspeed is not None and (recipe.deepspeed.zero_stage > 0 or recipe.deepspeed.config_file):
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
    trackers = list(recipe.tracking.trackers) if with_trackers else []
    if trackers:
        from dltrain.tracking import check_trackers

        check_trackers(trackers)
    warn_launcher_overrides(recipe, precision)
    kwargs = {}
    strategy = recipe.distributed.strategy
    if world > 1:
        # gloo is the CPU backend; DeepSpeed on CPU needs it named explicitly (see ENV-NOTES).
        backend = {"backend": "gloo"} if device_type == "cpu" else {}
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=dist_timeout(), **backend)]
        if strategy == "ddp" and not _use_deepspeed(recipe):
            kwargs["kwargs_handlers"].append(ddp_kwargs(recipe.distributed))
    if strategy == "fsdp":
        from dltrain import fsdp

        fsdp.check_usable(recipe, world, _use_deepspeed(recipe))
        if device_type == "cuda":  # on a CPU Accelerate's plugin does not run: dltrain.fsdp.shard applies FSDP2
            kwargs["fsdp_plugin"] = fsdp.build_plugin(recipe)
    if _use_deepspeed(recipe):
        kwargs["deepspeed_plugin"] = build_deepspeed_plugin(recipe, plan)
        # DeepSpeed calls these deprecated collectives on every step; the warning is not ours to fix.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=plan.grad_accum,
        log_with=trackers or None,
        project_dir=str(run_dir),
        cpu=device_type == "cpu" and "deepspeed_plugin" not in kwargs,
        **kwargs,
    )
    check_world(accelerator, world)
    check_deepspeed(accelerator, "deepspeed_plugin" in kwargs)
    if "fsdp_plugin" in kwargs and accelerator.distributed_type.name != "FSDP":
        raise RecipeError(f"the recipe asks for FSDP but Accelerate set up {accelerator.distributed_type.value}: "
                          "start it with `dltrain launch --fsdp --nproc N`")
    return accelerator, plan


def ddp_kwargs(dist):
    """torch DDP's settings from the recipe's `distributed` section; Accelerate passes them to
    DistributedDataParallel and registers the compression hook on the wrapped model."""
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    hook = {"none": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16,
            "fp16": DDPCommunicationHookType.FP16}[dist.comm_hook]
    return DistributedDataParallelKwargs(bucket_cap_mb=dist.bucket_cap_mb, gradient_as_bucket_view=dist.gradient_as_bucket_view,
                                         static_graph=dist.static_graph, find_unused_parameters=dist.find_unused_parameters,
                                         comm_hook=hook)


def describe_parallel(model) -> str | None:
    """One line on how the prepared model is parallelised, read from the wrapper itself (so it shows
    what reached torch, not what the recipe asked for); None for a model that is not wrapped."""
    from dltrain import fsdp

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        hooks = [getattr(h, "__name__", type(h).__name__) for h, _ in getattr(model, "_comm_hooks", [])] or ["none"]
        return (f"DDP: bucket_cap {model.bucket_bytes_cap / 2**20:g} MB, gradient_as_bucket_view "
                f"{model.gradient_as_bucket_view}, static_graph {model.static_graph}, find_unused_parameters "
                f"{model.find_unused_parameters}, comm hook {', '.join(hooks)}")
    return fsdp.describe(model)


def warn_launcher_overrides(recipe: RecipeBase, precision: str) -> None:
    """One line (rank 0) when the launcher asked for another precision than the recipe's: the recipe
    wins (Accelerator() is given it), e.g. over an Accelerate config's mixed_precision."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", precision) and os.environ.get("RANK", "0") == "0":
        # "no" is what `dltrain launch` passes itself (and Accelerate's default): not a user's choice.
        print(f"dltrain: warning: the recipe's train.precision={recipe.train.precision} overrides the launcher's "
              f"mixed_precision={launcher} (set train.precision to change it)", file=sys.stderr, flush=True)


def check_world(accelerator, launched: int) -> None:
    """Fail loudly when the launcher started N processes but each one sees a world of its own."""
    if accelerator.num_processes != launched:
        raise RecipeError(
            f"launched {launched} processes but this one sees a world of {accelerator.num_processes}: "
            "the processes are not connected (on a CPU use `dltrain launch --cpu --nproc N`)"
        )


def check_deepspeed(accelerator, requested: bool) -> None:
    """Accelerate drops a DeepSpeed plugin silently under ACCELERATE_USE_CPU (see ENV-NOTES)."""
    from accelerate.utils import DistributedType

    if requested and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RecipeError(
            f"the recipe asks for DeepSpeed but Accelerate set up {accelerator.distributed_type.value} "
            "(ACCELERATE_USE_CPU or --cpu disables DeepSpeed): start it with `dltrain launch --deepspeed STAGE`"
        )


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under Accelerate's wrappers. Accelerate's own unwrap_model imports DeepSpeed
    whenever it is installed (accelerate 1.15, utils/other.py), which costs seconds and logs
    "Setting accelerator to CPU" in runs that never asked for it; so it is called only under
    DeepSpeed, and otherwise DDP's wrapper is taken off here (dltrain compiles the step function,
    never the module, so there is no torch.compile wrapper to remove)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def full_state_dict(accelerator, model: torch.nn.Module) -> dict:
    """The whole model's weights: Accelerate's get_state_dict under DeepSpeed (it gathers ZeRO-3
    shards), the unwrapped module's otherwise (what get_state_dict does then, without importing
    DeepSpeed: see unwrap)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    return unwrap(accelerator, model).state_dict()


def check_ranks_in_sync(accelerator, model) -> None:
    """After training every rank must hold bit-identical replicated parameters; a difference means
    the processes did not all-reduce (unconnected copies) or diverged."""
    import hashlib

    from accelerate.utils import gather_object

    from dltrain import fsdp

    plugin = accelerator.state.deepspeed_plugin
    if accelerator.num_processes == 1 or (plugin is not None and plugin.zero_stage == 3) or fsdp.is_sharded(model):
        return  # ZeRO-3 and FSDP partition the parameters: there is no replica to compare
    digest = hashlib.sha256()
    for name, param in unwrap(accelerator, model).state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) != 1:
        from dltrain.trainer import TrainingError

        raise TrainingError(
            f"parameters differ between ranks after training ({len(set(digests))} distinct over "
            f"{len(digests)} ranks): the processes were not all-reducing"
        )
    if accelerator.is_main_process:  # not accelerator.print: that speaks once per node
        print(f"  parameters identical on all {len(digests)} ranks (sha256 {digests[0][:12]})", flush=True)


def build_deepspeed_plugin(recipe: RecipeBase, plan: BatchPlan):
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    if not is_deepspeed_available():
        raise RecipeError("the recipe asks for DeepSpeed (deepspeed.zero_stage > 0) but it is not installed: "
                          "pip install deepspeed, or set deepspeed.zero_stage=0")
    if "LOCAL_RANK" not in os.environ:  # plain `python -m dltrain`: DeepSpeed finds no process group
        raise RecipeError("DeepSpeed runs under a launcher: use `dltrain launch RECIPE --deepspeed STAGE ...`")
    ds = recipe.deepspeed
    config_file = deepspeed_config_file(recipe)
    if config_file != "none":  # a DeepSpeed JSON: the recipe's deepspeed.config_file, or the launcher's
        plugin = DeepSpeedPlugin(hf_ds_config=config_file, gradient_accumulation_steps=plan.grad_accum,
                                 gradient_clipping=recipe.train.clip_grad_norm or 0.0, zero3_save_16bit_model=True)
        if ds is not None and ds.zero_stage > 0 and ds.zero_stage != plugin.zero_stage:
            raise RecipeError(f"{config_file} sets ZeRO stage {plugin.zero_stage} but the recipe has "
                              f"deepspeed.zero_stage={ds.zero_stage}: make them agree (or drop the recipe's)")
    else:
        stage = ds.zero_stage if ds is not None else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        plugin = DeepSpeedPlugin(
            zero_stage=stage,
            gradient_accumulation_steps=plan.grad_accum,
            offload_optimizer_device=ds.offload_optimizer if ds else "none",
            offload_param_device=ds.offload_params if ds else "none",
            zero3_save_16bit_model=True,  # lets get_state_dict gather ZeRO-3 shards for export
        )
    # The recipe and the world size are the truth for the batch figures and clipping (DeepSpeed
    # clips and accumulates inside its engine): fill 'auto' with them, refuse numbers that differ.
    # Accelerate could fill 'auto' batch sizes only from a prepared DataLoader, which dltrain has not.
    ours = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "train_batch_size": plan.global_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": recipe.train.clip_grad_norm or 0.0,
    }
    for key, value in ours.items():
        given = plugin.deepspeed_config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise RecipeError(f"DeepSpeed config {config_file}: {key}={given} but the recipe and world size give {value}: "
                              f'set it to "auto" there')
        plugin.deepspeed_config[key] = value
    plugin.gradient_accumulation_steps = plan.grad_accum
    return plugin


def deepspeed_config_file(recipe: RecipeBase) -> str:
    """The DeepSpeed JSON to use ("none": build the config from deepspeed.zero_stage): the recipe's
    deepspeed.config_file, else the one an Accelerate config names (ACCELERATE_DEEPSPEED_CONFIG_FILE)."""
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    ours = recipe.deepspeed.config_file if recipe.deepspeed is not None else None
    if not ours:
        return launcher
    path = os.path.abspath(os.path.expanduser(ours))
    try:
        with open(path) as f:
            json.load(f)
    except OSError as exc:
        raise RecipeError(f"deepspeed.config_file={ours}: cannot read it ({exc.strerror}): give the path of a DeepSpeed JSON") from None
    except ValueError as exc:
        raise RecipeError(f"deepspeed.config_file={ours} is not JSON ({exc}): give a DeepSpeed JSON config") from None
    if launcher != "none" and os.path.abspath(launcher) != path and os.environ.get("RANK", "0") == "0":
        print(f"dltrain: warning: the recipe's deepspeed.config_file={ours} overrides the launcher's {launcher}",
              file=sys.stderr, flush=True)
    return path


def rendezvous_error(exc: Exception) -> str:
    """One line for a process group that cannot open or reach its rendezvous (e.g. a busy port)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if "EADDRINUSE" in reason or "address already in use" in reason:
        reason = "the port is already in use by another process"
    return f"cannot open the rendezvous at {where} ({reason[:160]}): pick a free port (MASTER_PORT, or --master ADDR:PORT)"
