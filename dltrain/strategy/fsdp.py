"""FSDP2 (`distributed.strategy: fsdp`): parameters, gradients and optimizer state sharded over
the processes with torch's `fully_shard`, applied by dltrain on a CPU and a GPU alike, as
torchtitan does on GPUs. Accelerate's FSDP plugin is not used: it does not run on a CPU (gloo),
so a GPU-only path through it would be a path no test takes. The model and its optimizer stay out
of `accelerator.prepare` (which refuses DTensor parameters under DDP); checkpoints are written
with torch.distributed.checkpoint's state-dict helpers.

Units: each module chosen by `distributed.fsdp.auto_wrap` (class names, or a parameter count) is
sharded as one unit (one all-gather before its forward and backward, one reduce-scatter of its
gradients), then the root takes the remaining parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dltrain.errors import RecipeError
from dltrain.precision import DTYPES
from dltrain.strategy.base import OptimizerFactory, Strategy, apply_compile, guarded_step

SHARDED_DIR = "fsdp_sharded"  # torch.distributed.checkpoint folder of a sharded checkpoint
FULL_MODEL = "model.safetensors"
FULL_OPTIMIZER = "fsdp_optimizer.pt"


class FSDP(Strategy):
    name = "fsdp"

    @classmethod
    def refusal(cls, recipe, world: int, device_type: str) -> str | None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return (
                "distributed.strategy=fsdp but the launcher is configured for DeepSpeed (ACCELERATE_USE_DEEPSPEED): "
                "use `dltrain launch --fsdp`, or strategy deepspeed"
            )
        if world == 1:
            return (
                "distributed.strategy=fsdp shards over several processes and this run has one: "
                "use `dltrain launch RECIPE --fsdp --nproc N` with N >= 2, or strategy ddp"
            )
        if recipe.train.precision == "fp16":
            return (
                "distributed.strategy=fsdp with train.precision=fp16 needs a sharded loss scaler, which dltrain "
                "does not have: use train.precision=bf16 (or strategy ddp for fp16)"
            )
        return None

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        cfg = self.recipe.distributed.fsdp
        model = model.to(self.accelerator.device)
        chosen = units(model, cfg.auto_wrap)
        if self.recipe.train.compile.enabled:
            # Each unit's forward, before its FSDP hooks exist: they then run outside the compiled
            # code. With inner units the root's own forward stays eager (it calls the units).
            apply_compile(innermost(chosen) or [model], self.recipe.train.compile)
        reshard = cfg.sharding == "full_shard"
        policy = mp_policy(self.recipe)
        from torch.distributed.fsdp import fully_shard

        for unit in chosen:
            fully_shard(unit, reshard_after_forward=reshard, mp_policy=policy)
        # The root's parameters are needed again at once by backward: FSDP keeps them unless told to reshard.
        self.model = fully_shard(model, reshard_after_forward=None if reshard else False, mp_policy=policy)
        self.optimizer = make_optimizer(self.model)  # after sharding: it must hold the DTensor parameters

    def backward(self, loss: torch.Tensor) -> None:
        accum = self.plan.grad_accum
        (loss / accum if accum > 1 else loss).backward()

    def step(self, loss_sum: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return guarded_step(self.optimizer, self.model.parameters(), loss_sum, self.recipe.train.clip_grad_norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def module(self) -> nn.Module:
        return self.model

    def replicated(self) -> bool:
        return False  # each rank holds its shard: there is no replica to compare

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (an empty dict elsewhere), gathered from the shards."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_options(True))

    def save(self, path: Path) -> None:
        """Random states through Accelerate (it holds no model here), then the model and optimizer
        as the recipe's `distributed.fsdp.state_dict_type` says."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.accelerator.save_state(str(path), safe_serialization=True)
        full = self.recipe.distributed.fsdp.state_dict_type == "full"
        model_sd = get_model_state_dict(self.model, options=_options(full))
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=_options(full))
        if not full:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / SHARDED_DIR))
        elif self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(path / FULL_MODEL))
            torch.save(optim_sd, path / FULL_OPTIMIZER)

    def load(self, path: Path) -> None:
        """Whichever format the checkpoint holds (a change of state_dict_type between segments only
        changes how later checkpoints are written)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (path / SHARDED_DIR).is_dir() and not (path / FULL_OPTIMIZER).is_file():
            raise RecipeError(
                f"checkpoint {path} holds no FSDP state ({SHARDED_DIR}/ or {FULL_OPTIMIZER}): it was written "
                "by another strategy; resume it with that strategy's recipe"
            )
        self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        model, optimizer = self.model, self.optimizer
        if (path / SHARDED_DIR).is_dir():
            import torch.distributed.checkpoint as dcp

            _check_metadata(path / SHARDED_DIR)  # every rank, before any collective: all refuse alike
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
            # Each rank reads its own shards, in place, through readers that unpickle nothing but
            # the checkpoint's own metadata classes (torch's would run any pickle found there).
            dcp.load(state, storage_reader=_SafeReader(path / SHARDED_DIR), planner=_SafePlanner())
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optim"])
        else:
            from safetensors.torch import load_file

            options = _options(True)  # every rank reads the whole file and keeps its shard
            set_model_state_dict(model, load_file(str(path / FULL_MODEL)), options=options)
            set_optimizer_state_dict(
                model, optimizer, torch.load(path / FULL_OPTIMIZER, weights_only=True), options=options
            )

    def describe(self) -> str | None:
        from torch.distributed.fsdp import FSDPModule

        model = self.model
        inner = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        kinds = sorted({type(m).__name__.removeprefix("FSDP") for m in inner})
        return (
            f"FSDP2: {len(inner)} unit(s){' (' + ', '.join(kinds) + ')' if kinds else ''} + root; "
            f"this rank holds {local:,} of {total:,} parameters"
        )


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
        raise RecipeError(
            f"distributed.fsdp.auto_wrap: no module of class {', '.join(sorted(missing))} in this model "
            f"(its classes: {', '.join(classes)[:300]})"
        )
    return found[::-1]  # innermost first: a unit's parameters are taken before its parent's


def innermost(chosen: list[nn.Module]) -> list[nn.Module]:
    """The units that hold no other unit: compiling an outer one would trace its inner units' hooks."""
    ids = {id(unit) for unit in chosen}
    return [unit for unit in chosen if not any(id(m) in ids for m in unit.modules() if m is not unit)]


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


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


# ----------------------------------------------------------------------------------------------
# Loading a sharded checkpoint without running what a file says
#
# torch.distributed.checkpoint reads `.metadata` with plain pickle and non-tensor entries (an
# optimizer's hyperparameters) with torch's unrestricted loader: a crafted file would run
# code on every rank at `--resume`. dltrain's readers take only what its own checkpoints hold.


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)


def _allowed(module: str, name: str):
    """What a checkpoint's metadata may name: DCP's own classes (never a function), torch.Size,
    torch's dtypes, layouts and memory formats (and the lookup torch pickles a layout with), the
    checkpoint's path, OrderedDict. None for anything else."""
    import collections
    import importlib
    import pathlib

    if (module, name) == ("torch.serialization", "_get_layout"):
        from torch.serialization import _get_layout  # a name -> torch.layout lookup, nothing more

        return _get_layout
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath"):
        return getattr(pathlib, name)
    if module in _METADATA_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return obj if isinstance(obj, type) else None
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    return collections.OrderedDict if (module, name) == ("collections", "OrderedDict") else None


def _safe_unpickler():
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            obj = _allowed(module, name)
            if obj is None:
                raise RecipeError(
                    f"{SHARDED_DIR}/.metadata asks to load {module}.{name}, which a dltrain checkpoint "
                    "never holds: the file was not written by dltrain; refusing to read it"
                )
            return obj

    return Unpickler


def _check_metadata(folder: Path) -> None:
    """Read `.metadata` through the safe unpickler: a planted pickle is refused here on every rank
    (inside dcp.load only the coordinator reads it, and the other ranks fail another way)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(folder / ".metadata", "rb") as f:
            metadata = _safe_unpickler()(f).load()
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a cut-off or foreign file: one line
        raise RecipeError(
            f"{folder}/.metadata cannot be read ({type(exc).__name__}): the checkpoint is damaged"
        ) from None
    if not isinstance(metadata, Metadata):
        raise RecipeError(f"{folder}/.metadata is not a checkpoint's metadata: refusing to read it")


def _SafeReader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _safe_unpickler()(f).load()
            if not isinstance(metadata, Metadata):
                raise RecipeError(f"{SHARDED_DIR}/.metadata is not a checkpoint's metadata: refusing to read it")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def _SafePlanner():
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - an unpickling refusal: one line, never run it
                raise RecipeError(
                    f"{SHARDED_DIR}: entry {read_item.dest_index.fqn} is not plain data "
                    f"({type(exc).__name__}): refusing to read it"
                ) from None
            value = io.BytesIO()
            torch.save(loaded, value)
            value.seek(0)
            super().load_bytes(read_item, value)

    return Planner()
