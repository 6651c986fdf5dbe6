"""Recipes the schema must refuse before a run starts (issue 14): alias bombs, bytes that are not
UTF-8, and values inside the types but outside what torch, W&B or the OS accept downstream."""

from __future__ import annotations

import sys
import tracemalloc

import pytest

import dltrain.workloads.bert  # noqa: F401 - the built-in workloads (torch) imported now: the counts are the loader's
import dltrain.workloads.cnn  # noqa: F401
import dltrain.workloads.rnn  # noqa: F401
from conftest import RECIPES
from dltrain.cli import main
from dltrain.recipe import MAX_COUNT, RecipeError, load_recipe

CNN = RECIPES / "cnn_mnist.yaml"
RNN = RECIPES / "rnn_sine.yaml"

# 0.5 KB: nine levels of nine aliases, 9**9 (387 million) strings once expanded.
BOMB_LEVELS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
)


# Function calls (Python and built-in) a refusal may make. Work, not wall time: a timed bound
# (2 s) failed on a loaded machine (3.49 s) and proves nothing on a quiet one. Measured 2026-12-07:
# 1,000-62,000 calls for these refusals, 150,000 for the 3,000-deep nesting; expanding the 9**9
# alias bomb would take hundreds of millions.
MAX_CALLS = 100_000
# PyYAML reads text one character at a time (its reader's peek): a huge value costs calls in
# proportion to its length, which is fine; work that grew faster than the text would not be.
CALLS_PER_CHARACTER = 3


def _refused_cheaply(load, max_calls: int = MAX_CALLS, trace: bool = True) -> str:
    """The RecipeError `load` raises, checked to come with bounded work (calls, memory) and on one
    short line."""
    calls = 0

    def count(frame, event, arg):  # sys.setprofile's hook: every Python and built-in call
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    if trace:
        tracemalloc.start()
    sys.setprofile(count)
    try:
        with pytest.raises(RecipeError) as info:
            load()
    finally:
        sys.setprofile(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert calls < max_calls, calls
    message = str(info.value)
    assert peak < 20 * 2**20, peak  # MB, not the GB the expansion would take (0 untraced)
    assert "\n" not in message and len(message) < 400, message[:1000]
    return message


@pytest.mark.parametrize("field", ["name", "description", "workload", "tracking: {tags", "profiles: {x"])
def test_an_alias_bomb_is_refused_before_anything_expands_it(tmp_path, field):
    opened = field.count("{")
    text = f"workload: cnn\n{BOMB_LEVELS}\n" if field != "workload" else f"{BOMB_LEVELS}\n"
    text += f"{field}: *l8{'}' * opened}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert path.stat().st_size < 700
    message = _refused_cheaply(lambda: load_recipe(path))
    assert "alias" in message and str(path) in message


def test_an_alias_bomb_in_a_set_override_is_refused(tmp_path):
    levels = ", ".join(
        [f"&a0 [{', '.join(['x'] * 9)}]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    )
    message = _refused_cheaply(lambda: load_recipe(CNN, "cpu_test", [f"description=[{levels}]"]))
    assert "--set" in message and "alias" in message


def test_a_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    (tmp_path / "loop.yaml").write_text("workload: cnn\ndescription: &me [a, *me]\n")
    assert "contains itself" in _refused_cheaply(lambda: load_recipe(tmp_path / "loop.yaml"))
    (tmp_path / "deep.yaml").write_text("workload: cnn\ndescription: " + "[" * 100 + "]" * 100 + "\n")
    assert "nested more than" in _refused_cheaply(lambda: load_recipe(tmp_path / "deep.yaml"))
    # deeper than PyYAML's own recursion goes (a RecursionError inside safe_load); ~1 s of parsing
    (tmp_path / "deeper.yaml").write_text("workload: cnn\ndescription: " + "[" * 3000 + "]" * 3000 + "\n")
    deeper = _refused_cheaply(lambda: load_recipe(tmp_path / "deeper.yaml"), max_calls=2 * MAX_CALLS, trace=False)
    assert "nested too deeply" in deeper


@pytest.mark.parametrize(
    "text, expected",
    [
        ("workload: cnn\ntrain:\n  seed: " + "9" * 5000 + "\n", "digits"),  # PyYAML's int() raises ValueError
        ("workload: cnn\ntrain:\n  seed: 2024-13-01\n", "month"),  # a date that is not one
        ("workload: [cnn]\n", "unknown workload"),  # was a TypeError (unhashable list)
        ("workload: cnn\nprofiles:\n  cpu_test: 3\n", "a profile is a mapping"),
    ],
)
def test_yaml_that_pyyaml_or_the_loader_chokes_on_is_one_line(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    message = _refused_cheaply(lambda: load_recipe(path, "cpu_test" if "profiles" in text else None))
    assert expected in message


def test_a_huge_value_or_key_is_echoed_cut_short():
    linear = MAX_CALLS + CALLS_PER_CHARACTER * 100_000
    message = _refused_cheaply(lambda: load_recipe(CNN, "cpu_test", ["train.precision=" + "x" * 100_000]), linear)
    assert "train.precision" in message and "..." in message
    message = _refused_cheaply(lambda: load_recipe(CNN, "cpu_test", ["train.a\nb" + "k" * 100_000 + "=1"]), linear)
    assert "unknown key 'train.a\\nbkkk" in message


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("workload: cnn\ndescription: " + "x" * (2 << 20) + "\n")
    assert "MiB" in _refused_cheaply(lambda: load_recipe(path))


def test_a_recipe_that_is_not_utf8_is_refused_and_list_skips_it(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"workload: cnn\ndescription: caf\xe9 au lait\n")
    (tmp_path / "good.yaml").write_text("workload: cnn\ndescription: a good one\nprofiles: {cpu_test: {}}\n")
    (tmp_path / "odd.yaml").write_text("workload: [a, list]\ndescription: {a: 1}\nprofiles: 3\n")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_recipe(bad)
    monkeypatch.setenv("DLTRAIN_RECIPES_DIR", str(tmp_path))
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert "good.yaml" in out and "a good one" in out and "[profiles: cpu_test]" in out
    assert "odd.yaml" in out  # odd values are listed as text, not a TypeError
    assert "latin1.yaml" not in out
    (warning,) = err.splitlines()
    assert warning.startswith("dltrain: warning: skipping latin1.yaml:") and "UTF-8" in warning


# ----------------------------------------------------------------------------------------------
# Bounds of the common sections


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.momentum=.nan", "optim.momentum"),
        ("optim.betas=[.nan, 0.9]", "optim.betas.0"),
        ("optim.betas=[0.9, 1]", "optim.betas"),
        ("schedule.warmup_fraction=.nan", "schedule.warmup_fraction"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
        (f"schedule.warmup_steps={2**70}", "schedule.warmup_steps"),
        ("train.epochs=0", "train.epochs"),
        (f"train.max_steps={MAX_COUNT + 1}", "train.max_steps"),
        (f"train.global_batch_size={2**70}", "train.global_batch_size"),
        ("train.clip_grad_norm=.inf", "train.clip_grad_norm"),
        ("train.seed=-1", "train.seed"),
        (f"train.seed={2**32}", "train.seed"),
        (f"train.eval_every={2**70}", "train.eval_every"),
        ("train.log_every=0", "train.log_every"),
        ("train.sync_every=0", "train.sync_every"),
        ("train.warmup_steps_excluded=-1", "train.warmup_steps_excluded"),
        ("tracking.project=a/b", "tracking.project"),
        ("tracking.project=''", "tracking.project"),
        ("tracking.project=" + "p" * 129, "tracking.project"),
        ('tracking.project="a\\nb"', "tracking.project"),
        ("tracking.tags=['']", "tracking.tags.0"),
        ("tracking.tags=[ok, " + "t" * 65 + "]", "tracking.tags.1"),
        (f"checkpoint.keep_last={2**70}", "checkpoint.keep_last"),
        ("deepspeed.offload_optimizer=cpu", "deepspeed"),  # stage 0 runs without DeepSpeed: dropped silently
        ("deepspeed.offload_params=cpu", "deepspeed"),  # ZeRO-3 only
        ("target.value=.nan", "target.value"),
        ("target.value=.inf", "target.value"),
        ("name=../escaped", "name"),
        ("name=a/b", "name"),
        ("name=/tmp/abs", "name"),
        ("name=a\\b", "name"),
        ("name=..", "name"),
        ("name='  '", "name"),
        ('name="x\\ny"', "name"),
        ('name="a\\0b"', "name"),
        ("name=" + "n" * 201, "name"),
    ],
)
def test_values_downstream_code_cannot_take_are_refused_naming_the_key(override, key):
    with pytest.raises(RecipeError) as info:
        load_recipe(CNN, "cpu_test", [override])
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message and len(message) < 400, message


def test_edges_that_work_are_accepted():
    recipe = load_recipe(
        CNN,
        "cpu_test",
        [
            "train.seed=0",
            f"train.max_steps={MAX_COUNT}",
            "name=' my run 1 '",
            "tracking.tags=[" + "t" * 64 + "]",
            "tracking.project=team-proj_1.x",
        ],
    )
    assert recipe.name == "my run 1" and recipe.train.max_steps == MAX_COUNT
    assert load_recipe(CNN, "cpu_test", [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_save_best_without_a_target_is_refused():
    # it ran, and silently never saved a best model: "best" is by target.metric
    with pytest.raises(RecipeError, match="'checkpoint.save_best'.*no target"):
        load_recipe(CNN, "cpu_test", ["checkpoint.save_best=true", "target=null"])
    assert load_recipe(CNN, "cpu_test", ["checkpoint.save_best=true"]).checkpoint.save_best


def test_an_empty_length_is_refused():
    # epochs and max_steps both empty: the run crashed computing its length (TypeError, exit 1)
    with pytest.raises(RecipeError, match="train.epochs and train.max_steps are both empty"):
        load_recipe(CNN, "cpu_test", ["train.epochs=null", "train.max_steps=null"])
    assert load_recipe(CNN, "cpu_test", ["train.epochs=null", "train.max_steps=5"]).train.max_steps == 5


@pytest.mark.parametrize(
    "recipe, good, listed",
    [
        (CNN, "val/loss", "val/loss, val/accuracy"),
        (RNN, "val/mse_ratio", "val/loss, val/mse, val/naive_mse, val/mse_ratio"),
        (RECIPES / "bert_sst2_minilm.yaml", "val/loss", "val/loss, val/accuracy"),
    ],
)
def test_a_target_metric_the_workload_never_reports_is_refused_with_the_list(recipe, good, listed):
    assert load_recipe(recipe, "cpu_test", [f"target.metric={good}"]).target.metric == good
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, "cpu_test", ["target.metric=val/acuracy"])
    assert "'target.metric'" in str(info.value) and listed in str(info.value)
    # a test metric is a record's target, judged once after a fixed schedule: never a stopping rule
    fixed = ["target.metric=test/loss", "target.mode=min", "target.stop=false", "checkpoint.save_best=false"]
    if "bert" in str(recipe):  # a test metric needs a test split (SST-2's test set has no labels)
        fixed.append("data.test_file=test.tsv")
    assert load_recipe(recipe, "cpu_test", fixed).target.metric == "test/loss"
    for key in ("target.stop", "checkpoint.save_best"):
        with pytest.raises(RecipeError, match=f"'{key}': the test split is evaluated once, after training"):
            load_recipe(recipe, "cpu_test", [*fixed, f"{key}=true"])


def test_each_workloads_metrics_are_what_its_evaluation_reports():
    """METRICS (what target.metric is checked against) against the keys evaluate() builds: the
    workload's summarize() of the statistics its forward() returns on a real batch."""
    import torch

    from dltrain.workload import get_workload

    batches = {
        "cnn": (torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])),
        "rnn": (torch.randn(4, 10, 1), torch.randn(4)),
    }
    for name, batch in batches.items():
        module = get_workload(name)
        model = module.build_model(
            load_recipe(RECIPES / f"{ {'cnn': 'cnn_mnist', 'rnn': 'rnn_sine'}[name] }.yaml", "cpu_test")
        )
        with torch.no_grad():
            stats = module.forward(model.eval(), batch).stats  # as evaluate() calls it
        sums = {k: v.sum().item() for k, v in stats.items()} | {"count": 4.0}
        reported = {f"{split}/{k}" for split in ("val", "test") for k in module.summarize(sums)}
        assert set(module.metrics) == reported, name
    bert = get_workload("bert")  # its forward's statistics, without loading a model
    sums = {"loss": 1.0, "correct": 1.0, "tokens": 30.0, "padded_tokens": 40.0, "count": 4.0}
    assert set(bert.metrics) == {f"{split}/{k}" for split in ("val", "test") for k in bert.summarize(sums)}
