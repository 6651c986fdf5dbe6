"""The `distributed` recipe section without training: strategy resolution and contradictions, what
a resume may change, the launcher's --fsdp, FSDP's units and precision policy (the same on a CPU
and a GPU: tests/distributed/test_strategies.py trains it)."""

from __future__ import annotations

import pytest

from conftest import RECIPES, run_cli
from dltrain import resume_rules
from dltrain.recipe import RecipeError, dump_recipe, load_recipe
from dltrain.strategy import fsdp

CNN = RECIPES / "cnn_mnist.yaml"
MINILM = RECIPES / "bert_sst2_minilm.yaml"


def _cnn(*overrides: str):
    return load_recipe(CNN, "cpu_test", list(overrides))


def test_the_strategy_is_ddp_or_deepspeed_by_its_zero_stage():
    assert _cnn().distributed.strategy == "ddp"
    assert _cnn("deepspeed.zero_stage=2").distributed.strategy == "deepspeed"
    assert _cnn("distributed.strategy=fsdp").distributed.strategy == "fsdp"
    # A resolved recipe (as run directories and checkpoints store it) parses to the same.
    again = _cnn("deepspeed.zero_stage=1", "distributed.strategy=deepspeed")
    assert dump_recipe(again) == dump_recipe(_cnn("deepspeed.zero_stage=1"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distributed.strategy=deepspeed"], "distributed.strategy=deepspeed needs deepspeed.zero_stage 1, 2 or 3"),
        (
            ["distributed.strategy=fsdp", "deepspeed.zero_stage=2"],
            "distributed.strategy=fsdp but deepspeed.zero_stage=2: pick one",
        ),
        (
            ["deepspeed.zero_stage=2", "distributed.comm_hook=bf16"],
            "distributed.comm_hook is a DDP setting, and distributed.strategy is deepspeed",
        ),
        (["distributed.strategy=fsdp", "distributed.bucket_cap_mb=5"], "distributed.bucket_cap_mb is a DDP setting"),
        (["distributed.fsdp.sharding=shard_grad_op"], "distributed.fsdp is set but distributed.strategy is ddp"),
        (
            ["distributed.strategy=fsdp", "distributed.fsdp.sharding=no_shard"],
            "bad value at 'distributed.fsdp.sharding'",
        ),
        (["distributed.comm_hook=powersgd"], "bad value at 'distributed.comm_hook'"),
        (["distributed.bucket_cap_mb=0"], "bad value at 'distributed.bucket_cap_mb'"),
    ],
)
def test_contradictions_and_typos_are_refused_in_one_line(overrides, message):
    with pytest.raises(RecipeError, match="^.*$") as info:
        _cnn(*overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_resume_may_change_how_ddp_buckets_but_not_what_it_sums():
    saved = dump_recipe(_cnn())
    changes = resume_rules.recipe_changes(
        saved,
        _cnn(
            "distributed.bucket_cap_mb=1", "distributed.static_graph=true", "distributed.gradient_as_bucket_view=true"
        ),
        "ckpt",
    )
    assert {c["key"] for c in changes} == {
        "distributed.bucket_cap_mb",
        "distributed.static_graph",
        "distributed.gradient_as_bucket_view",
    }
    with pytest.raises(RecipeError, match=r"distributed\.comm_hook \('none' -> 'bf16'\)"):
        resume_rules.recipe_changes(saved, _cnn("distributed.comm_hook=bf16"), "ckpt")
    with pytest.raises(RecipeError, match=r"distributed\.strategy \('ddp' -> 'fsdp'\)"):
        resume_rules.recipe_changes(saved, _cnn("distributed.strategy=fsdp"), "ckpt")
    fsdp_saved = dump_recipe(_cnn("distributed.strategy=fsdp"))
    assert resume_rules.recipe_changes(
        fsdp_saved, _cnn("distributed.strategy=fsdp", "distributed.fsdp.state_dict_type=full"), "c"
    )
    with pytest.raises(RecipeError, match=r"distributed\.fsdp\.auto_wrap"):
        resume_rules.recipe_changes(
            fsdp_saved, _cnn("distributed.strategy=fsdp", "distributed.fsdp.auto_wrap=[Linear]"), "c"
        )


def test_launch_fsdp_sets_the_strategy_and_needs_two_processes():
    done = run_cli("launch", str(CNN), "--profile", "cpu_test", "--cpu", "--nproc", "2", "--fsdp", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "ACCELERATE_USE_CPU=true" in done.stdout and "--multi_gpu" in done.stdout
    assert "--set distributed.strategy=fsdp" in done.stdout
    one = run_cli("launch", str(CNN), "--profile", "cpu_test", "--cpu", "--nproc", "1", "--fsdp", "--dry-run")
    assert one.returncode == 2 and "--fsdp shards over several processes: give --nproc 2 or more" in one.stderr
    both = run_cli(
        "launch", str(CNN), "--profile", "cpu_test", "--cpu", "--nproc", "2", "--fsdp", "--deepspeed", "2", "--dry-run"
    )
    assert both.returncode == 2 and "--fsdp and --deepspeed are two strategies" in both.stderr


def test_fsdp_on_one_process_is_refused_before_training(tmp_path):
    done = run_cli(
        "train",
        str(CNN),
        "--profile",
        "cpu_test",
        "--set",
        "distributed.strategy=fsdp",
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert done.returncode == 2
    assert "distributed.strategy=fsdp shards over several processes and this run has one" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_fsdp_units_by_class_and_by_size():
    from dltrain.workloads import cnn

    model = cnn.build_model(_cnn())
    assert [type(m).__name__ for m in fsdp.units(model, ["Linear"])] == ["Linear", "Linear"]
    # Size: Linear(3136 -> 128) holds 401,536 parameters; the convolutions 320 and 18,496.
    assert [type(m).__name__ for m in fsdp.units(model, 100_000)] == ["Linear"]
    assert [type(m).__name__ for m in fsdp.units(model, 1_000)] == ["Conv2d", "Linear", "Linear"]
    with pytest.raises(RecipeError, match="no module of class BertLayer in this model"):
        fsdp.units(model, ["BertLayer"])


def test_fsdp_asks_accelerate_for_nothing_and_takes_its_precision_from_the_recipe():
    """One FSDP path on every device: no Accelerate plugin (it does not run on a CPU, so a GPU-only
    path through it would be untested); the gather and reduce dtypes come from the recipe."""
    import torch

    from dltrain.accel import plan_batches
    from dltrain.strategy import FSDP, strategy_class

    recipe = load_recipe(
        MINILM,
        "cpu_test",
        ["distributed.strategy=fsdp", "distributed.fsdp.auto_wrap=[BertLayer]", "train.precision=bf16"],
    )
    assert strategy_class(recipe) is FSDP
    for device in ("cpu", "cuda"):
        assert FSDP.accelerator_kwargs(recipe, plan_batches(recipe.train, 2), 2, device) == {}
    policy = fsdp.mp_policy(recipe)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    same = fsdp.mp_policy(
        load_recipe(
            MINILM,
            "cpu_test",
            ["distributed.strategy=fsdp", "train.precision=bf16", "distributed.fsdp.reduce_dtype=same"],
        )
    )
    assert same.reduce_dtype == torch.bfloat16
    assert fsdp.mp_policy(_cnn("distributed.strategy=fsdp")).param_dtype is None  # fp32: nothing cast


def test_the_ddp_settings_suite_parses_and_runs_each_setting_on_two_processes():
    from dltrain.bench.suite import expand, load_suite

    suite = load_suite("ddp_settings")
    jobs = expand(suite)  # every job's recipe parsed with its full set of overrides, as it runs
    assert [j.config for j in jobs if j.world == 1] == [
        "cnn_ddp-w1-fp32-tput",
        "rnn_ddp-w1-fp32-tput",
        "minilm_ddp-w1-fp32-tput",
    ]
    by_entry = {j.entry.name: j for j in jobs if j.world == 2}
    for workload in ("cnn", "rnn", "minilm"):
        for setting in (
            "ddp",
            "bucket1",
            "bucket100",
            "bucketview",
            "static",
            "unused",
            "hook_bf16",
            "hook_fp16",
            "fsdp",
        ):
            assert f"{workload}_{setting}" in by_entry
    assert by_entry["minilm_fsdp_units"].entry.overrides == [
        "distributed.strategy=fsdp",
        "distributed.fsdp.auto_wrap=[BertLayer]",
    ]
