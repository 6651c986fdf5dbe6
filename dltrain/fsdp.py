"""FSDP2 (`distributed.strategy: fsdp`): shard parameters, gradients and optimizer state.

Two paths to the same torch `fully_shard`:

* on a GPU, Accelerate's FullyShardedDataParallelPlugin (fsdp_version=2) wraps the model in
  `accelerator.prepare`, and Accelerate's save_state/load_state write and read its checkpoints;
* on a CPU (gloo), Accelerate's plugin does not run: under ACCELERATE_USE_CPU it reports MULTI_CPU
  and wraps the model in plain DDP, without it each process trains alone (measured with accelerate
  1.15, see ../shared/ENV-NOTES.md). There `shard` applies `fully_shard` itself, the model and its
  optimizer are kept out of `accelerator.prepare` (which refuses a model with DTensor parameters
  under DDP), and `save`/`load` write the model and optimizer with torch.distributed.checkpoint's
  state-dict helpers (get/set_model_state_dict, get/set_optimizer_state_dict).

Units: each module chosen by `distributed.fsdp.auto_wrap` (class names, or a parameter count) is
sharded as one unit (one all-gather before its forward and backward, one reduce-scatter of its
gradients), then the root takes the remaining parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dltrain.recipe import RecipeError

SHARDED_DIR = "fsdp_sharded"  # torch.distributed.checkpoint folder of a sharded checkpoint
FULL_MODEL = "model.safetensors"
FULL_OPTIMIZER = "fsdp_optimizer.pt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_usable(recipe, world: int, deepspeed_env: bool) -> None:
    if deepspeed_env:
        raise RecipeError("distributed.strategy=fsdp but the launcher is configured for DeepSpeed "
                          "(ACCELERATE_USE_DEEPSPEED): use `dltrain launch --fsdp`, or strategy deepspeed")
    if world == 1:
        raise RecipeError("distributed.strategy=fsdp shards over several processes and this run has one: "
                          "use `dltrain launch RECIPE --fsdp --nproc N` with N >= 2, or strategy ddp")


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_direct(accelerator, model) -> bool:
    """Sharded by dltrain (the CPU path), not by Accelerate's plugin."""
    return is_sharded(model) and accelerator.distributed_type.name != "FSDP"


def mp_policy(recipe):
    """Parameters gathered in the training dtype; gradients reduced in fp32 unless `reduce_dtype: same`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = recipe.train.precision
    if precision == "fp32":
        return MixedPrecisionPolicy()
    reduce = torch.float32 if recipe.distributed.fsdp.reduce_dtype == "fp32" else DTYPES[precision]
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=reduce)


def units(model: nn.Module, auto_wrap) -> list[nn.Module]:
    """The modules to shard as units before the root, innermost first (fully_shard's order)."""
    if isinstance(auto_wrap, int):
        found: list[nn.Module] = []
        for child in model.children():
            _by_size(child, auto_wrap, found)
        return found
    names = set(auto_wrap)
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    missing = names - {type(m).__name__ for m in found}
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise RecipeError(f"distributed.fsdp.auto_wrap: no module of class {', '.join(sorted(missing))} in this model "
                          f"(its classes: {', '.join(classes)[:300]})")
    return found[::-1]  # innermost first: a unit's parameters are taken before its parent's


def _by_size(module: nn.Module, min_params: int, found: list) -> int:
    """As torch's size_based_auto_wrap_policy: a module becomes a unit when the parameters under it
    not yet in a unit reach `min_params`; returns the count left to its parent."""
    n = sum(p.numel() for p in module.parameters(recurse=False))
    for child in module.children():
        n += _by_size(child, min_params, found)
    if n >= min_params:
        found.append(module)
        return 0
    return n


def shard(accelerator, recipe, model: nn.Module) -> nn.Module:
    """The CPU path: apply fully_shard to the units, then the root. Before the optimizer is built,
    which must hold the sharded (DTensor) parameters. Elsewhere the model is returned as it is."""
    if recipe.distributed.strategy != "fsdp" or accelerator.distributed_type.name != "MULTI_CPU":
        return model
    from torch.distributed.fsdp import fully_shard

    cfg = recipe.distributed.fsdp
    reshard = cfg.sharding == "full_shard"
    policy = mp_policy(recipe)
    for unit in units(model, cfg.auto_wrap):
        fully_shard(unit, reshard_after_forward=reshard, mp_policy=policy)
    # The root's parameters are needed again at once by backward: FSDP keeps them unless told to reshard.
    return fully_shard(model, reshard_after_forward=None if reshard else False, mp_policy=policy)


def prepare(accelerator, model, optimizer):
    """accelerator.prepare, except for a model dltrain sharded itself (see the module docstring)."""
    if is_direct(accelerator, model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def build_plugin(recipe):
    """The GPU path: Accelerate's FSDP plugin, FSDP2, with the recipe's units, sharding, precision
    and checkpoint format (Accelerate's save_state/load_state then follow state_dict_type)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    cfg = recipe.distributed.fsdp
    if isinstance(cfg.auto_wrap, int):
        wrap = {"auto_wrap_policy": "size_based_wrap", "min_num_params": cfg.auto_wrap}
    elif cfg.auto_wrap:
        wrap = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": list(cfg.auto_wrap)}
    else:
        wrap = {"auto_wrap_policy": "no_wrap"}
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=cfg.sharding == "full_shard", mixed_precision_policy=mp_policy(recipe),
        state_dict_type="SHARDED_STATE_DICT" if cfg.state_dict_type == "sharded" else "FULL_STATE_DICT", **wrap)


def describe(model) -> str | None:
    if not is_sharded(model):
        return None
    from torch.distributed.fsdp import FSDPModule

    inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    kinds = sorted({type(m).__name__.removeprefix("FSDP") for m in inner})
    return (f"FSDP2: {len(inner)} unit(s){' (' + ', '.join(kinds) + ')' if kinds else ''} + root; "
            f"this rank holds {local:,} of {total:,} parameters")


# ----------------------------------------------------------------------------------------------
# State dicts (the CPU path; on a GPU Accelerate's save_state does this)


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def full_model_state(model) -> dict:
    """The whole model's weights on rank 0 (an empty dict elsewhere), gathered from the shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(True))


def save(loop, out: Path) -> None:
    """Every rank: the model and optimizer of a directly sharded model, as the recipe's
    `distributed.fsdp.state_dict_type` says."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = loop.recipe.distributed.fsdp.state_dict_type == "full"
    model_sd = get_model_state_dict(loop.model, options=_options(full))
    optim_sd = get_optimizer_state_dict(loop.model, loop.optimizer, options=_options(full))
    if not full:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / SHARDED_DIR))
    elif loop.accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(out / FULL_MODEL))
        torch.save(optim_sd, out / FULL_OPTIMIZER)


def load(loop, path: Path) -> None:
    """Every rank: restore what `save` wrote, whichever format the checkpoint holds (a change of
    state_dict_type between segments only changes how later checkpoints are written)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model, optimizer = loop.model, loop.optimizer
    if (path / SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))  # each rank reads its own shards, in place
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    elif (path / FULL_OPTIMIZER).is_file():
        from safetensors.torch import load_file

        options = _options(True)  # every rank reads the whole file and keeps its shard
        set_model_state_dict(model, load_file(str(path / FULL_MODEL)), options=options)
        set_optimizer_state_dict(model, optimizer, torch.load(path / FULL_OPTIMIZER, weights_only=True), options=options)
    else:
        raise RecipeError(f"checkpoint {path} holds no FSDP state ({SHARDED_DIR}/ or {FULL_OPTIMIZER}): it was written by "
                          "another strategy; resume it with that strategy's recipe")
