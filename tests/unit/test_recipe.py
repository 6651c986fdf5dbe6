"""Recipes: validation, profiles, overrides, and the one-line errors a user sees."""

from __future__ import annotations

import pytest
import yaml

from conftest import RECIPES, run_cli
from dltrain.recipe import RecipeError, dump_recipe, load_recipe


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {"workload": "cnn", "train": {"epochs": 1, "global_batch_size": 32}}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_and_profiles_validate(path):
    raw = yaml.safe_load(path.read_text())
    load_recipe(path)
    for profile in raw.get("profiles", {}):
        load_recipe(path, profile=profile)


def test_profile_is_merged_deeply(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"lr": 0.01}, "profiles": {"quick": {"train": {"epochs": 3}}}})
    recipe = load_recipe(path, profile="quick")
    assert recipe.train.epochs == 3
    assert recipe.train.global_batch_size == 32  # kept from the base
    assert recipe.optim.lr == 0.01


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(
        path, overrides=["optim.lr=3e-4", "train.epochs=2", "tracking.tags=[a, b]", "data.loader=torch"]
    )
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.train.epochs == 2 and isinstance(recipe.train.epochs, int)
    assert recipe.tracking.tags == ["a", "b"]
    assert recipe.data.loader == "torch"


@pytest.mark.parametrize(
    "raw, overrides, expected",
    [
        ({**BASE, "trian": {}}, [], "unknown key 'trian'"),
        ({**BASE, "optim": {"lr": -1}}, [], "'optim.lr'"),
        ({**BASE, "train": {"global_batch_size": 0}}, [], "'train.global_batch_size'"),
        ({**BASE, "train": {"epochs": "many"}}, [], "'train.epochs'"),
        ({**BASE, "data": {"val_fraction": 1.5}}, [], "'data.val_fraction'"),
        ({**BASE, "model": {"hiden": 3}}, [], "unknown key 'model.hiden'"),
        ({**BASE, "train": {"precision": "fp8"}}, [], "'train.precision'"),
        ({"workload": "gan"}, [], "unknown workload 'gan'"),
        (BASE, ["train.epoch=3"], "unknown key 'train.epoch'"),
        (BASE, ["optim.lr=abc"], "'optim.lr'"),
        (BASE, ["optim.lr.x=1"], "'optim.lr'"),
        ({**BASE, "optim": {"lr": 0.1}}, ["optim.lr.x=1"], "'optim.lr' is a value"),
        (BASE, ["optim.lr"], "expected key.path=value"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, raw, overrides, expected):
    path = write(tmp_path, raw)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides=overrides)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_unknown_profile_lists_the_known_ones(tmp_path):
    path = write(tmp_path, {**BASE, "profiles": {"cpu_test": {}}})
    with pytest.raises(RecipeError, match="unknown profile 'gpu'.*cpu_test"):
        load_recipe(path, profile="gpu")


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "workload: cnn\ntrain: [1, 2\n")
    with pytest.raises(RecipeError, match=r"invalid YAML at line \d+"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "cnn_mnist.yaml", profile="cpu_test", overrides=["optim.lr=0.002"])
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again.model_dump() == recipe.model_dump() | {"profiles": {}}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "no/such/recipe.yaml"], "recipe file not found"),
        (["train", str(RECIPES / "cnn_mnist.yaml"), "--set", "train.global_batch_size=-4"], "train.global_batch_size"),
        (["train", str(RECIPES / "cnn_mnist.yaml"), "--profile", "nope"], "unknown profile 'nope'"),
        (["train", str(RECIPES / "cnn_mnist.yaml"), "--set", "train.precision=fp16"], "fp16 needs a CUDA GPU"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, expected):
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("dltrain: error:")]
    assert len(error_lines) == 1


def test_list_shows_every_recipe():
    result = run_cli("list", timeout=60)
    assert result.returncode == 0
    for path in RECIPES.glob("*.yaml"):
        assert path.name in result.stdout
