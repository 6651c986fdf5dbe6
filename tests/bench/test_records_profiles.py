"""The `fast` record profiles (issue 11): they load, keep the seed architecture, never stop early,
target the record's test metric, and the CNN one trains end to end for a few steps."""

from __future__ import annotations

import json

import pytest

from conftest import RECIPES, run_cli
from dltrain.recipe import load_recipe, read_yaml

# recipe file -> the record's metric (read once on the test split), its value and mode (issue 11)
RECORDS = {
    "cnn_mnist.yaml": ("test/accuracy", 0.99, "max"),
    "rnn_sine.yaml": ("test/mse_ratio", 0.01, "min"),
}
PROFILES = [
    (name, profile)
    for name in RECORDS
    for profile in read_yaml(RECIPES / name)["profiles"]
    if profile.startswith("fast")
]


def test_each_record_recipe_has_a_fast_profile():
    assert {name for name, profile in PROFILES if profile == "fast"} == set(RECORDS)


@pytest.mark.parametrize("name, profile", PROFILES)
def test_fast_profile_keeps_the_architecture_and_targets_the_record(name, profile):
    base = load_recipe(RECIPES / name)
    fast = load_recipe(RECIPES / name, profile)
    assert fast.workload == base.workload
    # the record is for the seed architecture; a memory format (model.channels_last) and the order of
    # ReLU and max-pool (model.pool_before_relu: the same function and gradients bit for bit,
    # tests/integration/test_cnn_fast_model.py) change how it runs, not what it computes
    layout = {"channels_last", "pool_before_relu"}
    assert fast.model.model_dump(exclude=layout) == base.model.model_dump(exclude=layout)
    metric, value, mode = RECORDS[name]
    assert (fast.target.metric, fast.target.value, fast.target.mode) == (metric, value, mode)
    assert fast.target.stop is False  # a fixed schedule: nothing ends it early
    assert fast.checkpoint.save_best is False  # no model is picked by a held-out metric


@pytest.mark.parametrize("name, profile", PROFILES)
def test_fast_profile_validates_only_at_the_end(name, profile):
    fast = load_recipe(RECIPES / name, profile)
    assert fast.train.epochs is not None and fast.train.max_steps is None
    # eval_every 0 would validate after every epoch (wall time); a step count past the run's
    # last step leaves one validation, at the end.
    data = fast.data
    n_train = 60_000 * (1 - data.val_fraction) if fast.workload == "cnn" else data.num_sequences * data.train_fraction
    total_steps = fast.train.epochs * int(n_train) // fast.train.global_batch_size
    assert fast.train.eval_every > total_steps


def test_the_rnn_fast_profile_keeps_the_test_split():
    """The fast profile moves sequences from validation to train; the test split (the last ones)
    must stay the same sequences, so its test/mse_ratio compares with the base recipe's."""
    from dltrain.workloads.rnn import split_sizes

    base = load_recipe(RECIPES / "rnn_sine.yaml")
    fast = load_recipe(RECIPES / "rnn_sine.yaml", "fast")
    assert fast.data.num_sequences == base.data.num_sequences and fast.data.seed == base.data.seed
    assert split_sizes(fast.data)[2] == split_sizes(base.data)[2]


@pytest.mark.long
def test_the_cnn_fast_profile_trains_end_to_end(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        str(RECIPES / "cnn_mnist.yaml"),
        "--profile",
        "fast",
        "--set",
        "train.max_steps=3",
        "--output-dir",
        str(out),
        env={"DLTRAIN_DATA_DIR": str(data_dir)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["test/examples"] == 10_000 and "test/accuracy" in summary["metrics"]
    assert summary["throughput"]["train_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/accuracy" in r] == [3]  # one validation, at the end
    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.target.metric == "test/accuracy" and resolved.schedule.name == "linear_warmup"
    assert not (out / "final_model").exists()
