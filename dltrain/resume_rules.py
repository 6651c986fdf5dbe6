"""Resuming with a changed recipe: the checkpoint stores the recipe it was trained with. A change to
what defines the model, the data or their order (workload, model.*, data.*, train.seed,
train.global_batch_size, train.precision, optim.name, optim.no_decay_bias_norm, deepspeed.*, distributed.strategy,
distributed.comm_hook, distributed.fsdp.auto_wrap / reduce_dtype) is refused with one line listing
the changed keys. Changes to what users change when continuing a run (RESUMABLE below: length,
cadences, learning rate and optimizer hyperparameters, schedule, tracking, target) are applied,
printed, and listed in summary.json under `resumed_with_changes`.

The run directory's side of a resume (its identity, segments, lock) is dltrain.rundir's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dltrain.recipe import RecipeError, dump_recipe

# Keys (or sections, as prefixes) a resume may change. Everything else must stay as the
# checkpoint's recipe has it: a key added here must not change the model, the data or its order.
RESUMABLE = (
    "name",
    "description",
    "train.epochs",
    "train.max_steps",
    "train.eval_every",
    "train.log_every",
    "train.sync_every",
    "train.max_nonfinite_steps",
    "train.warmup_steps_excluded",
    "train.compile",
    "train.tf32",
    "train.clip_grad_norm",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.cpu_threads",
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.momentum",
    "optim.fused",
    "schedule",
    "tracking",
    "checkpoint",
    "target",
    # Workload keys that change neither the examples nor their order.
    "data.padding",
    "data.bucket_multiple",
    "data.loader",
    "data.num_workers",
    # How DDP buckets and schedules the same all-reduce, and when FSDP frees gathered parameters
    # or in which layout the next checkpoints are written: the sums are the same. Not so the
    # strategy, a gradient compression hook, FSDP's units or reduce dtype.
    "distributed.bucket_cap_mb",
    "distributed.gradient_as_bucket_view",
    "distributed.static_graph",
    "distributed.find_unused_parameters",
    "distributed.fsdp.sharding",
    "distributed.fsdp.state_dict_type",
)
# Changes after which the optimizer's hyperparameters and the LR schedule are set anew.
RESCHEDULE = ("optim.", "schedule", "train.epochs", "train.max_steps")


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def recipe_changes(saved_yaml: str, recipe, checkpoint: Path) -> list[dict]:
    """[{key, from, to}] for each resumable change from the checkpoint's recipe; a change to
    anything else raises RecipeError listing every such key. Keys the saved recipe does not have
    (added to the schema since) are not changes."""
    saved = _flat(yaml.safe_load(saved_yaml) or {})
    now = _flat(yaml.safe_load(dump_recipe(recipe)))
    changed = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
    refused = [k for k in changed if not _resumable(k)]
    if refused:
        shown = ", ".join(f"{k} ({_short(saved[k])} -> {_short(now[k])})" for k in refused)
        raise RecipeError(
            f"cannot resume from {checkpoint} with a different {shown}: a resume keeps the model, the data, its "
            "order and the optimizer type; use the checkpoint's values, or start a new run in another --output-dir"
        )
    return [{"key": k, "from": saved[k], "to": now[k]} for k in changed]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe(changes: list[dict]) -> str:
    return ", ".join(f"{c['key']} {_short(c['from'])} -> {_short(c['to'])}" for c in changes)


def apply_to_optimizer(changes: list[dict], recipe, optimizer, scheduler) -> None:
    """After a resume with changes: the loaded optimizer and scheduler states carry the old
    hyperparameters and base LR (torch restores them from the checkpoint); set the recipe's, and
    the LR the new schedule gives at the current step."""
    if not any(c["key"].startswith(RESCHEDULE) for c in changes):
        return
    cfg = recipe.optim
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0 if group.get("no_decay") else cfg.weight_decay  # dltrain.optim's groups
        group["initial_lr"] = cfg.lr
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def changes_so_far(identity: dict) -> list[dict]:
    """Every resumed segment's recipe changes, each with the step it was applied at."""
    return [change | {"at_step": seg["from_step"]} for seg in identity.get("segments", []) for change in seg["changes"]]
