"""Recipes: YAML files checked by a typed, closed schema.

A recipe holds values, never code. Loading goes: read YAML (safe_load) -> pick a named profile
and deep-merge it -> apply `--set a.b=value` overrides -> validate with the workload's pydantic
model (unknown keys are errors). Any problem raises RecipeError, whose message names the file
and the key path; the CLI prints it on one line and exits with code 2.

Bounds are those of the code downstream: a value the schema accepts must not crash the run. Floats
are finite, counts at most MAX_COUNT, seeds in [0, 2**32), names not paths, W&B names as W&B takes
them; a file over MAX_RECIPE_BYTES, or whose YAML aliases expand past MAX_EXPANDED_SIZE (a "billion
laughs" bomb), is refused before anything copies, merges or validates it (dltrain.recipe_file); an
echoed value is cut short.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

# Reading files safely lives in recipe_file; its names are this module's too (RecipeError above all).
from dltrain.recipe_file import (
    MAX_DEPTH,
    MAX_EXPANDED_SIZE,
    MAX_RECIPE_BYTES,
    RecipeError,  # noqa: F401
    apply_override,
    check_size,
    clip,
    deep_merge,
    parse_value,
    read_text,
    read_yaml,
    shown,
)

# The schema's names are this module's too: workloads and plugins import them from either.
from dltrain.sections import (
    MAX_COUNT,
    TRACKERS,
    CheckpointConfig,
    CompileConfig,
    Count,  # noqa: F401
    DeepSpeedConfig,
    DistributedConfig,
    FSDPConfig,
    HubIdOrPath,
    LocalPath,
    OptimConfig,
    RecipeBase,
    ScheduleConfig,
    Section,
    Steps,
    TargetConfig,
    TrackingConfig,
    TrainConfig,
    WandbName,
    check_name,
    resolve_strategy,
)

# ----------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple) -> str:
    return clip(".".join(str(p) for p in loc), 120) or "(top level)"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = _format_loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if err["type"] == "missing":
        return f"missing required key '{where}'"
    value = err.get("input")
    echoed = "" if isinstance(value, dict) else f" (got {shown(value)})"
    message = clip(err["msg"].removeprefix("Value error, "), 200)
    if not err["loc"]:  # a check across sections (e.g. the strategy): its message names the keys
        return message
    return f"bad value at '{where}': {message}{echoed}"


def validate(raw: dict, source: str = "recipe") -> RecipeBase:
    from dltrain.workload import get_workload  # the registry: workloads are imported only when named

    workload = raw.get("workload")
    try:
        module = get_workload(workload)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    try:
        recipe = module.recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_error(exc)}") from None
    _check_target(recipe, module.metrics, workload, source)
    if recipe.checkpoint.save_best and recipe.target is None:  # "best" is by target.metric: nothing would be saved
        raise RecipeError(
            f"{source}: bad value at 'checkpoint.save_best': the best model is the best target.metric, "
            "and this recipe has no target: give one (target.metric, target.value) or set save_best false"
        )
    return recipe


def _check_target(recipe: RecipeBase, metrics: tuple, workload: str, source: str) -> None:
    """A target the workload never reports would leave time-to-target null without a word. A
    validation metric is checked at each evaluation; a test metric is measured once, after a fixed
    schedule (the time-to-accuracy records' rule), so it can neither stop training nor pick a best
    model: peeking at the test split to stop would make the record meaningless."""
    target = recipe.target
    if target is None or not metrics:
        return
    if target.metric not in metrics:
        raise RecipeError(
            f"{source}: bad value at 'target.metric': {shown(target.metric)} is not a metric the "
            f"{workload} workload reports; give one of {', '.join(metrics)}"
        )
    if target.metric.startswith("test/") and (target.stop or recipe.checkpoint.save_best):
        key = "target.stop" if target.stop else "checkpoint.save_best"
        raise RecipeError(
            f"{source}: bad value at '{key}': the test split is evaluated once, after training, and must "
            f"not decide when to stop or which model to keep; set {key}=false, or target a val/ metric"
        )


def load_recipe(
    path: str | Path, profile: str | None = None, overrides: list[str] = (), merge: dict | None = None
) -> RecipeBase:
    """The recipe in `path` (a path, or the name of a shipped recipe: dltrain.shipped.resolve), with
    `profile` merged in, then `merge` (a nested dict of recipe keys, what dltrain.train's keyword
    overrides become), then the `--set` assignments."""
    from dltrain.shipped import resolve

    path = resolve(path)
    raw = resolve_raw(read_yaml(path), str(path), profile, overrides, merge)
    raw.setdefault("name", path.stem + (f"-{profile}" if profile else ""))
    return validate(raw, source=str(path))


def resolve_raw(
    raw: dict, source: str, profile: str | None = None, overrides: list[str] = (), merge: dict | None = None
) -> dict:
    """A raw recipe with its profile, `merge` and `--set` assignments applied, not yet validated."""
    profiles = raw.get("profiles") or {}
    if profile:
        if not isinstance(profiles, dict) or profile not in profiles:
            known = ", ".join(map(str, profiles)) if isinstance(profiles, dict) and profiles else "none"
            raise RecipeError(
                f"{source}: unknown profile '{clip(profile)}' (profiles in this recipe: {clip(known, 200)})"
            )
        if not isinstance(profiles[profile] or {}, dict):
            raise RecipeError(
                f"{source}: bad value at 'profiles.{clip(profile)}': a profile is a mapping of recipe "
                f"keys, got {type(profiles[profile]).__name__}"
            )
        raw = deep_merge(raw, profiles[profile] or {})
    if merge:
        raw = deep_merge(raw, merge)
    for assignment in overrides:
        apply_override(raw, assignment, source=f"{source}: --set")
    check_size(raw, f"{source} with its --set overrides")
    return raw


def dump_recipe(recipe: RecipeBase) -> str:
    data = recipe.model_dump(mode="json", exclude={"profiles"})
    return yaml.safe_dump(data, sort_keys=False)
