"""The Python API: `dltrain.train(recipe, **overrides) -> RunResult`, for notebooks and scripts.

    import dltrain
    a = dltrain.train("recipes/cnn_mnist.yaml", profile="cpu_test", train={"max_steps": 3})
    b = dltrain.train("recipes/cnn_mnist.yaml", profile="cpu_test", train__max_steps=3, train__precision="bf16")
    a.metrics["val/accuracy"], b.run_dir

Each call starts as a fresh interpreter would, and leaves the process so: what a run leaves in
it (Accelerate's singleton states, which otherwise refuse a second run with another precision; an
unfinished W&B run; torch.compile's caches; the peak-memory counters) is reset before and after.
Unlike `dltrain train`, the library installs no signal handlers (the program keeps its own) and
leaves the host allocator as the program has it (dltrain.allocator: the command line tunes it).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """What a run produced: its directory, final metrics and the whole summary.json."""

    run_dir: Path
    metrics: dict[str, float]
    summary: dict[str, Any] = field(repr=False)
    recipe: Any = field(repr=False)  # the validated recipe (a RecipeBase subclass) the run used


def reset_state() -> None:
    """Forget what a run leaves in the process: the next one starts as in a fresh interpreter."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # a run that failed before end_training
    AcceleratorState._reset_state(reset_partial_state=True)  # and PartialState: device, cpu flag
    GradientState._reset_state()
    torch._dynamo.reset()  # compiled graphs and guards; the next compiled run compiles afresh
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the peak RSS (VmHWM) that dltrain.metrics reports as the run's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides as nested recipe keys: `train={"max_steps": 3}` as it is, `train__max_steps=3`
    (a double underscore nests, since a keyword cannot hold a dot) as {"train": {"max_steps": 3}}."""
    from dltrain.recipe import deep_merge

    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split("__")
        for part in reversed(parts[1:]):
            value = {part: value}
        out = deep_merge(out, {parts[0]: value})
    return out


def load(recipe, profile: str | None = None, sets: list[str] = (), **overrides):
    """A validated recipe from a path, a raw dict or a recipe object, with `profile`, the keyword
    overrides and the `--set`-style assignments `sets` applied (in that order)."""
    from dltrain.recipe import RecipeBase, load_recipe, resolve_raw, validate

    sets = [sets] if isinstance(sets, str) else sets  # one assignment, not its characters
    merge = _nested(overrides)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, profile, list(sets), merge=merge)
    if isinstance(recipe, RecipeBase):
        recipe = recipe.model_dump(mode="json")
    if not isinstance(recipe, dict):
        raise TypeError(f"dltrain.train takes a recipe path, dict or recipe object, got {type(recipe).__name__}")
    raw = resolve_raw(recipe, "recipe", profile, list(sets), merge)
    raw.setdefault("name", str(raw.get("workload")) + (f"-{profile}" if profile else ""))
    return validate(raw)


def train(
    recipe,
    *,
    profile: str | None = None,
    output_dir: str | Path | None = None,
    resume: str | None = None,
    sets: list[str] = (),
    **overrides,
) -> RunResult:
    """Train `recipe` (a YAML path, a raw dict or a recipe object) in this process and return its
    result. `profile` picks a named profile; keyword arguments override recipe keys
    (`train={"max_steps": 3}` or `train__max_steps=3`); `sets` takes `--set` strings
    ("train.max_steps=3"); `output_dir` and `resume` are `dltrain train`'s --output-dir and --resume.
    Errors a user can cause raise dltrain.recipe.RecipeError or dltrain.data.DataError."""
    from dltrain import run

    resolved = load(recipe, profile, sets, **overrides)
    reset_state()
    try:
        summary = run.train(resolved, output_dir=None if output_dir is None else str(output_dir), resume=resume)
    finally:
        reset_state()  # and after: whatever the program does next with Accelerate starts afresh too
    return RunResult(
        run_dir=Path(summary["run_dir"]), metrics=dict(summary["metrics"]), summary=summary, recipe=resolved
    )
