"""Recipes: YAML files checked by a typed, closed schema.

A recipe holds values, never code. Loading goes: read YAML (safe_load) -> pick a named profile
and deep-merge it -> apply `--set a.b=value` overrides -> validate with the workload's pydantic
model (unknown keys are errors). Any problem raises RecipeError, whose message names the file
and the key path; the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator


class RecipeError(Exception):
    """A recipe, profile or override the user can fix. The message is one line."""


class Section(BaseModel):
    # Closed: a misspelt key is an error, not a silently ignored value.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.0, ge=0, description="SGD only")
    fused: bool | None = Field(None, description="torch's fused optimizer step (one kernel for all parameters); "
                                                 "default: on, except under DeepSpeed, which steps its own partitions")

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must each be in [0, 1)")
        return self


class ScheduleConfig(Section):
    name: Literal["none", "linear_warmup"] = "none"
    # linear_warmup: lr rises linearly over warmup_steps (or warmup_fraction of all steps), then
    # decays linearly to zero at the last optimizer step.
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float = Field(0.0, ge=0, le=1)


class CompileConfig(Section):
    """torch.compile of the training forward and loss (backward through AOTAutograd); the first
    (compiling) steps fall in the warm-up. `train.compile: true` is short for `enabled: true`."""

    enabled: bool = False
    # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fullgraph: bool = True  # a graph break is an error, not a silent slow path
    dynamic: bool | None = False  # False: shapes are static in the steady state (fixed batches, BERT buckets)

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value):
        return {"enabled": value} if isinstance(value, bool) else value


class TrainConfig(Section):
    epochs: PositiveInt | None = 1
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; overrides epochs")
    global_batch_size: PositiveInt = 64
    # Hardware stays out of recipes: per-device batch and accumulation are derived from the world
    # size. Give one of them to pin it; the three must then multiply out to global_batch_size.
    micro_batch_size: PositiveInt | None = None
    grad_accum: PositiveInt | None = None
    clip_grad_norm: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = each epoch")
    log_every: PositiveInt = 50
    max_nonfinite_steps: int = Field(0, ge=0, description="non-finite losses tolerated before stopping")
    warmup_steps_excluded: int = Field(5, ge=0, description="first steps left out of throughput")
    # Steps between host reads (non-finite check, stop on a signal): the step never waits for the
    # device in between. null: by device, 1 on a CPU with one process (a read costs nothing
    # there), 50 on a GPU or with several processes.
    sync_every: PositiveInt | None = None
    compile: CompileConfig = CompileConfig()
    # TF32 for fp32 matmuls and convolutions on Ampere and newer GPUs (torch's own default differs
    # between the two); MFU of an fp32 run is taken against the TF32 peak when on, FP32 when off.
    tf32: bool = False


class TrackingConfig(Section):
    wandb: bool = True
    project: str = "dltrain"
    tags: list[str] = []
    plots: bool = True


class CheckpointConfig(Section):
    every_steps: PositiveInt | None = None
    every_epochs: PositiveInt | None = None
    keep_last: PositiveInt = 2
    dir: str | None = Field(None, description="default: RUN_DIR/checkpoints; a relative path is taken inside the run directory")
    # A `dir` outside the run directory (e.g. a scratch filesystem) is refused unless this is true;
    # pruning there deletes only this run's checkpoints (dltrain.rundir).
    outside_run_dir: bool = False
    save_final_model: bool = True
    save_best: bool = False  # export the model at each new best value of `target.metric`


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"


class TargetConfig(Section):
    """What 'trained' means for time-to-target: a metric and the value to reach."""

    metric: str = "val/accuracy"
    value: float = 0.99
    mode: Literal["max", "min"] = "max"
    stop: bool = False  # end training at the first evaluation that reaches the target


class RecipeBase(Section):
    workload: str
    name: str = ""
    description: str = ""
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    deepspeed: DeepSpeedConfig | None = None
    target: TargetConfig | None = None
    # Profiles are merged before validation; kept here only so a resolved recipe still parses.
    profiles: dict[str, dict[str, Any]] = {}


# ----------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = _format_loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if err["type"] == "missing":
        return f"missing required key '{where}'"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"bad value at '{where}': {err['msg']}{shown}"


def parse_value(text: str) -> Any:
    """Type an override the way YAML would (`3` -> int, `1e-3` -> float, `[1,2]` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '1e-3' as a string; the schema coerces numeric strings anyway.
    return value


def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    if "=" not in assignment:
        raise RecipeError(f"{source} '{assignment}': expected key.path=value")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"{source} '{assignment}': empty key in path '{path}'")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            prefix = ".".join(keys[: i + 1])
            raise RecipeError(f"{source} '{assignment}': '{prefix}' is a value, not a section")
        node = child
    node[keys[-1]] = parse_value(text)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (see `dltrain list` for the shipped recipes)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    return raw


def validate(raw: dict, source: str = "recipe") -> RecipeBase:
    from dltrain.workloads import WORKLOADS

    workload = raw.get("workload")
    if workload not in WORKLOADS:
        known = ", ".join(sorted(WORKLOADS))
        raise RecipeError(f"{source}: unknown workload {workload!r} at 'workload' (known: {known})")
    try:
        return WORKLOADS[workload].Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_error(exc)}") from None


def load_recipe(path: str | Path, profile: str | None = None, overrides: list[str] = ()) -> RecipeBase:
    path = Path(path)
    raw = read_yaml(path)
    profiles = raw.get("profiles") or {}
    if profile:
        if not isinstance(profiles, dict) or profile not in profiles:
            known = ", ".join(profiles) if isinstance(profiles, dict) and profiles else "none"
            raise RecipeError(f"{path}: unknown profile '{profile}' (profiles in this recipe: {known})")
        raw = deep_merge(raw, profiles[profile] or {})
    for assignment in overrides:
        apply_override(raw, assignment, source=f"{path}: --set")
    raw.setdefault("name", path.stem + (f"-{profile}" if profile else ""))
    return validate(raw, source=str(path))


def dump_recipe(recipe: RecipeBase) -> str:
    data = recipe.model_dump(mode="json", exclude={"profiles"})
    return yaml.safe_dump(data, sort_keys=False)
