"""The Python API (dltrain.train): several runs in one process, as a notebook makes them."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import RECIPES


@pytest.mark.long
def test_two_runs_in_one_process_with_another_precision(tmp_path, data_dir, monkeypatch):
    """Without resetting Accelerate's singletons, the second call fails with "AcceleratorState has
    already been initialized and cannot be changed" (precision fp32 -> bf16)."""
    import dltrain
    from dltrain import allocator

    monkeypatch.chdir(tmp_path)  # runs/<name>-<time> lands here
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1")}
    tuned_before = allocator._applied
    quick = {
        "data": {"root": str(data_dir), "val_fraction": 0.01},
        "tracking": {"plots": False},
        "checkpoint": {"save_final_model": False},
    }
    fp32 = dltrain.train(RECIPES / "cnn_mnist.yaml", profile="cpu_test", train={"max_steps": 3}, **quick)
    bf16 = dltrain.train(
        str(RECIPES / "cnn_mnist.yaml"), profile="cpu_test", train__max_steps=3, train__precision="bf16", **quick
    )
    assert isinstance(fp32, dltrain.RunResult) and fp32.run_dir != bf16.run_dir
    for result, precision in ((fp32, "fp32"), (bf16, "bf16")):
        summary = json.loads((result.run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and result.summary["steps"] == 3
        assert result.recipe.train.precision == precision
        assert 0.0 <= result.metrics["val/accuracy"] <= 1.0 and result.metrics["test/loss"] > 0
        assert result.run_dir.parent == tmp_path / "runs"
    # A library call leaves the program's signal handlers and allocator alone (the CLI sets both).
    assert {name: signal.getsignal(getattr(signal, name)) for name in handlers} == handlers
    assert allocator._applied == tuned_before


def test_keyword_overrides_nest_and_a_dict_recipe_works():
    from dltrain.api import _nested, load

    assert _nested({"train__max_steps": 3, "train": {"seed": 1}, "name": "x"}) == {
        "train": {"max_steps": 3, "seed": 1},
        "name": "x",
    }
    recipe = load({"workload": "rnn", "train": {"max_steps": 2}}, optim__lr=0.5)
    assert recipe.name == "rnn" and recipe.optim.lr == 0.5 and recipe.train.max_steps == 2
    again = load(recipe, sets=["train.seed=7"])  # a recipe object, with --set strings
    assert again.train.seed == 7 and again.optim.lr == 0.5


def test_a_bad_override_is_a_recipe_error():
    from dltrain.api import load
    from dltrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="unknown key 'train.max_stepz'"):
        load(RECIPES / "cnn_mnist.yaml", train__max_stepz=3)
