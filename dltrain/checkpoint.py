"""Checkpoints: periodic saves, best-model export, resume."""

from __future__ import annotations

from pathlib import Path

from dltrain.recipe import RecipeError


def attach(loop, run_dir: Path, resume: str | None):
    """Wire checkpointing into the loop; return the TrainState to resume from, or None."""
    if loop.recipe.checkpoint.save_best:
        from dltrain.run import export_model

        loop.on_new_best = lambda lp, state: export_model(lp, run_dir / "best_model")
    if resume:
        raise RecipeError("--resume is not available yet")
    return None
