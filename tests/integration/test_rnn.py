"""RNN on synthetic sine sequences: deterministic data, splits, the naive baseline, the cpu_test bar."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import RECIPES, run_cli
from dltrain.data import DataError
from dltrain.recipe import RecipeError, load_recipe
from dltrain.workloads import rnn

RECIPE = RECIPES / "rnn_sine.yaml"


def test_data_is_a_function_of_the_data_seed_only():
    base = load_recipe(RECIPE, "seed")
    x1, y1 = rnn.generate(base.data)
    x2, y2 = rnn.generate(load_recipe(RECIPE, "seed", ["train.seed=7"]).data)
    x3, _ = rnn.generate(load_recipe(RECIPE, "seed", ["data.seed=1"]).data)
    assert x1.shape == (1000, 10, 1) and y1.shape == (1000,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.abs().max() <= 1.5  # noise 0: |A sin(.)| <= the largest amplitude


def test_seed_profile_is_the_original_setup_with_70_15_15_splits():
    recipe = load_recipe(RECIPE, "seed")
    assert (recipe.model.cell, recipe.model.hidden, recipe.optim.name, recipe.optim.lr) == ("rnn", 32, "adam", 1e-3)
    assert (recipe.train.epochs, recipe.train.global_batch_size) == (10, 32)
    splits = rnn.build_data(recipe)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (700, 150, 150)
    x, y = rnn.generate(recipe.data)
    vx, vy = splits.val.fetch(torch.arange(150))
    assert torch.equal(vx, x[700:850]) and torch.equal(vy, y[700:850])  # disjoint, contiguous slices


def test_target_is_the_value_after_the_inputs():
    """Noise-free sequences: the target continues the same sine as the inputs."""
    recipe = load_recipe(RECIPE, "seed", ["data.num_sequences=50", "data.seq_len=3"])
    x, y = rnn.generate(recipe.data)
    # For a sine sampled at a fixed step, s[t+1] = 2 cos(w) s[t] - s[t-1]; solve cos(w) from the inputs.
    s0, s1, s2 = x[:, 0, 0].double(), x[:, 1, 0].double(), x[:, 2, 0].double()
    two_cos = (s2 + s0) / s1
    keep = s1.abs() > 0.2  # avoid dividing by values near zero
    assert torch.allclose((two_cos * s2 - s1)[keep], y.double()[keep], atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.val_fraction=0.0001"],
            r"data.num_sequences=4000 x data.val_fraction=0.0001 leaves the validation split empty",
        ),
        (["data.num_sequences=2"], "leaves the validation split empty"),  # 2 x 0.15 rounds to 0
        (
            ["data.num_sequences=3", "data.train_fraction=0.5", "data.val_fraction=0.49"],
            "no sequence for the test split",
        ),
    ],
)
def test_splits_that_round_to_nothing_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, "cpu_test", overrides)


def test_a_model_past_memory_is_one_line_naming_its_keys():
    recipe = load_recipe(RECIPE, "cpu_test", ["model.hidden=300000000"])  # a 3.6e17-byte matrix: past any address space
    with pytest.raises(DataError, match=r"not enough memory for the model .*: lower model.hidden or model.layers"):
        rnn.build_model(recipe)


def test_naive_statistic_and_ratio():
    recipe = load_recipe(RECIPE, "seed")
    torch.manual_seed(0)
    model = rnn.build_model(recipe)
    batch = rnn.build_data(recipe).test.fetch(torch.arange(8))
    x, y = batch
    train_out = rnn.forward(model, batch)
    assert train_out.stats == {}  # the training step computes its loss and nothing else
    out = rnn.forward(model.eval(), batch)
    assert torch.allclose(out.stats["loss"].mean(), train_out.loss.detach())
    assert torch.allclose(out.stats["naive_loss"], (x[:, -1, 0] - y) ** 2)
    sums = {"loss": 2.0, "naive_loss": 8.0, "count": 4.0}
    assert rnn.summarize(sums) == {"loss": 0.5, "mse": 0.5, "naive_mse": 2.0, "mse_ratio": 0.25}
    assert rnn.summarize({"loss": 2.0, "count": 4.0}) == {"loss": 0.5, "mse": 0.5}


def test_flops_count_the_gate_matmuls():
    rnn_flops = rnn.flops_per_sample(load_recipe(RECIPE, "seed"))
    assert rnn_flops == 3 * (10 * 2 * (1 + 32) * 32 + 2 * 32)
    lstm = rnn.flops_per_sample(load_recipe(RECIPE, "seed", ["model.cell=lstm"]))
    assert lstm - 3 * 2 * 32 == 4 * (rnn_flops - 3 * 2 * 32)


@pytest.mark.slow
def test_cpu_test_profile_beats_the_naive_predictor(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", str(RECIPE), "--profile", "cpu_test", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["test/examples"] == 600 and metrics["val/examples"] == 600
    assert metrics["test/naive_mse"] == pytest.approx(0.30, abs=0.05)  # fixed by the data seed
    assert metrics["test/mse_ratio"] < 0.1, metrics  # at least 10 times better than repeating the last value


def test_evaluation_statistics_follow_the_wrapped_modules_mode():
    """A DeepSpeed engine's eval() switches the module inside it only; its own `training` stays
    True. Evaluation must still report per-example errors (it crashed in the trainer without)."""
    recipe = load_recipe(RECIPES / "rnn_sine.yaml", "cpu_test")
    inner = rnn.build_model(recipe).eval()

    class Engine(torch.nn.Module):  # the DeepSpeed engine's train(mode) reaches only its module
        def __init__(self):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    engine = Engine()
    assert engine.training and not engine.module.training
    x, y = torch.randn(4, recipe.data.seq_len, 1), torch.randn(4)
    assert set(rnn.forward(engine, (x, y)).stats) == {"loss", "naive_loss"}
    inner.train()
    assert rnn.forward(engine, (x, y)).stats == {}
