"""DeepSpeed ZeRO 1-3 through Accelerate's DeepSpeed plugin: the engine wraps the model and the
optimizer, accumulates, clips and steps inside `accelerator.backward`, and skips a step whose
gradients are not finite by itself (its overflow check, on for fp16, bf16 and, through the
gradient norm, fp32). dltrain reads that decision from the engine instead of the loss.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from dltrain.errors import RecipeError
from dltrain.precision import DTYPES
from dltrain.strategy.base import OptimizerFactory, Strategy, apply_compile


class DeepSpeed(Strategy):
    name = "deepspeed"
    save_is_collective = True
    shards_per_rank = True  # ZeRO's optimizer (and for stage 3, parameter) partitions, one file per rank
    fused_optimizer = False  # the engine wraps and steps the optimizer: a plain torch one

    @classmethod
    def refusal(cls, recipe, world: int, device_type: str) -> str | None:
        if recipe.train.compile.enabled and stage_of(recipe) == 3:
            # ZeRO-3 gathers each module's parameters in hooks of its own, which a compiled forward
            # would have to trace; DeepSpeed's own engine.compile() is the way, and dltrain does not use it.
            return (
                "deepspeed.zero_stage=3 with train.compile: ZeRO-3's parameter-gathering hooks run inside every "
                "module's forward, which dltrain does not compile: set train.compile.enabled=false, or use ZeRO "
                "1/2 or fsdp"
            )
        return None

    @classmethod
    def accelerator_kwargs(cls, recipe, plan, world: int, device_type: str) -> dict:
        # DeepSpeed calls these deprecated collectives on every step; the warning is not ours to fix.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        return {"deepspeed_plugin": build_plugin(recipe, plan)}

    def check_accelerator(self) -> None:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            # ACCELERATE_USE_CPU or Accelerator(cpu=True) drops the plugin without a word.
            raise RecipeError(
                f"the recipe asks for DeepSpeed but Accelerate set up {self.accelerator.distributed_type.value} "
                "(ACCELERATE_USE_CPU or --cpu disables DeepSpeed): start it with `dltrain launch --deepspeed STAGE`"
            )

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        if self.recipe.train.compile.enabled:
            apply_compile([model], self.recipe.train.compile)  # ZeRO 1/2: the engine's hooks are on gradients
        if self.recipe.train.precision != "fp32":
            low = DTYPES[self.recipe.train.precision]
            # DeepSpeed's bf16/fp16 modes cast the parameters, not the inputs (no autocast): a
            # float batch would meet half-precision weights in the first layer. Floating inputs are
            # cast on the way in, outside any compiled code; integer inputs (token ids) stay.
            model.register_forward_pre_hook(
                lambda module, args, kwargs: _cast_floats(args, kwargs, low), with_kwargs=True
            )
        self.model, self.optimizer = self.accelerator.prepare(model, make_optimizer(model))

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # the engine's backward, and its step at an accumulation boundary

    def step(self, loss_sum: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The engine stepped in `backward` already (clipping included): only its verdict is left.
        `was_step_applied` is a host bool the engine computed in its own overflow check, so reading
        it costs no device wait of dltrain's; the loss is not read."""
        applied = self.model.was_step_applied()
        return [] if applied else [("nonfinite", torch.ones((), device=self.accelerator.device))]

    def zero_grad(self) -> None:
        pass  # the engine clears the gradients after its step

    def module(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def replicated(self) -> bool:
        return self.model.zero_optimization_stage() != 3  # ZeRO-3 partitions the parameters

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards (zero3_save_16bit_model)

    def save(self, path: Path) -> None:
        self.accelerator.save_state(str(path), safe_serialization=True)

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})

    def describe(self) -> str | None:
        return f"DeepSpeed ZeRO-{self.model.zero_optimization_stage()}"


def _cast_floats(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    def cast(x):
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def stage_of(recipe) -> int:
    return recipe.deepspeed.zero_stage if recipe.deepspeed is not None else 0


def build_plugin(recipe, plan):
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    if not is_deepspeed_available():
        raise RecipeError(
            "the recipe asks for DeepSpeed (deepspeed.zero_stage > 0) but it is not installed: "
            "pip install deepspeed, or set deepspeed.zero_stage=0"
        )
    if "LOCAL_RANK" not in os.environ:  # plain `python -m dltrain`: DeepSpeed finds no process group
        raise RecipeError("DeepSpeed runs under a launcher: use `dltrain launch RECIPE --deepspeed STAGE ...`")
    ds = recipe.deepspeed
    config_file = config_file_of(recipe)
    if config_file != "none":  # a DeepSpeed JSON: the recipe's deepspeed.config_file, or the launcher's
        plugin = DeepSpeedPlugin(
            hf_ds_config=config_file,
            gradient_accumulation_steps=plan.grad_accum,
            gradient_clipping=recipe.train.clip_grad_norm or 0.0,
            zero3_save_16bit_model=True,
        )
        if ds is not None and ds.zero_stage > 0 and ds.zero_stage != plugin.zero_stage:
            raise RecipeError(
                f"{config_file} sets ZeRO stage {plugin.zero_stage} but the recipe has "
                f"deepspeed.zero_stage={ds.zero_stage}: make them agree (or drop the recipe's)"
            )
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
            raise RecipeError(
                f"DeepSpeed config {config_file}: {key}={given} but the recipe and world size give {value}: "
                f'set it to "auto" there'
            )
        plugin.deepspeed_config[key] = value
    plugin.gradient_accumulation_steps = plan.grad_accum
    return plugin


def config_file_of(recipe) -> str:
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
        raise RecipeError(
            f"deepspeed.config_file={ours}: cannot read it ({exc.strerror}): give the path of a DeepSpeed JSON"
        ) from None
    except ValueError as exc:
        raise RecipeError(f"deepspeed.config_file={ours} is not JSON ({exc}): give a DeepSpeed JSON config") from None
    if launcher != "none" and os.path.abspath(launcher) != path and os.environ.get("RANK", "0") == "0":
        print(
            f"dltrain: warning: the recipe's deepspeed.config_file={ours} overrides the launcher's {launcher}",
            file=sys.stderr,
            flush=True,
        )
    return path
