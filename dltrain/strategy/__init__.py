"""The backends, one module each behind one interface (dltrain.strategy.base.Strategy):

    ddp.py        one process, or DDP over several (Accelerate wraps the model)
    fsdp.py       FSDP2: torch's fully_shard, applied by dltrain on a CPU and a GPU alike
    deepspeed.py  DeepSpeed ZeRO 1-3 (Accelerate's plugin; the engine steps inside backward)

`check` says, before any process starts, whether a recipe's combination of strategy, compile and
precision can run here; `create` builds the backend a recipe asks for once the Accelerator exists.
"""

from __future__ import annotations

import os

from dltrain.errors import RecipeError
from dltrain.strategy.base import Strategy
from dltrain.strategy.ddp import DDP
from dltrain.strategy.deepspeed import DeepSpeed
from dltrain.strategy.fsdp import FSDP

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def uses_deepspeed(recipe) -> bool:
    """The recipe asks for ZeRO, names a DeepSpeed config, or the launcher set DeepSpeed up."""
    ds = recipe.deepspeed
    if ds is not None and (ds.zero_stage > 0 or ds.config_file):
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def strategy_class(recipe) -> type[Strategy]:
    if recipe.distributed.strategy != "fsdp" and uses_deepspeed(recipe):
        return DeepSpeed
    return STRATEGIES[recipe.distributed.strategy]


def check(recipe, world: int, device_type: str) -> type[Strategy]:
    """The backend for this recipe, or RecipeError (one line) for a combination that cannot run."""
    if recipe.train.precision == "fp16" and device_type != "cuda":
        # Accelerate silently runs fp16 in float32 on a CPU; refuse rather than report fake fp16 numbers.
        raise RecipeError(
            f"train.precision=fp16 needs a CUDA GPU (this run is on {device_type}, where fp16 autocast "
            "is ignored): use --set train.precision=bf16 or fp32"
        )
    cls = strategy_class(recipe)
    why = cls.refusal(recipe, world, device_type)
    if why:
        raise RecipeError(why)
    return cls


def create(accelerator, recipe, plan) -> Strategy:
    strategy = strategy_class(recipe)(accelerator, recipe, plan)
    strategy.check_accelerator()
    return strategy


__all__ = ["DDP", "FSDP", "STRATEGIES", "DeepSpeed", "Strategy", "check", "create", "strategy_class", "uses_deepspeed"]
