"""Native to the ecosystem: Accelerate's trackers, HF-style optimizer groups and schedules, eval and
export, live output in a log file, --print-config and `dltrain schema`, DeepSpeed/Accelerate config
files, and the torchviz architecture graph."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from conftest import RECIPES, REPO, run_cli
from dltrain.recipe import RecipeError, dump_recipe, load_recipe

RNN_TINY = [
    str(RECIPES / "rnn_sine.yaml"),
    "--profile",
    "cpu_test",
    "--set",
    "train.max_steps=5",
    "--set",
    "train.eval_every=2",
    "--set",
    "checkpoint.every_steps=5",
]


# ----------------------------------------------------------------------------------------------
# One tiny run, watched as a SLURM log would see it (stdout and stderr are pipes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    run = tmp_path_factory.mktemp("eco") / "run"
    result = run_cli("train", *RNN_TINY, "--set", "tracking.trackers=[tensorboard]", "--output-dir", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    return run, result


@pytest.mark.long
def test_tensorboard_tracker_writes_event_files_with_the_logged_curves(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, result = tiny_run
    (events,) = (run / "tensorboard" / "dltrain").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"train/loss", "val/mse"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/mse")] == [2, 4, 5]
    assert "tensorboard --logdir" in result.stdout


def test_each_evaluation_prints_one_line_and_the_bar_writes_plain_lines(tiny_run):
    run, result = tiny_run
    evals = [line for line in result.stdout.splitlines() if line.startswith("eval step")]
    assert [line.split(" (")[0] for line in evals] == ["eval step 2", "eval step 4", "eval step 5"]
    assert "val/mse" in evals[0] and "(epoch 0.05)" in evals[0]
    assert "\r" not in result.stderr  # no carriage-return redraws in a log file
    assert any("5/5" in line and "step" in line for line in result.stderr.splitlines())


@pytest.mark.long
def test_eval_reports_the_same_metrics_as_training_as_json(tiny_run, tmp_path):
    run, _ = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "test.json"
    result = run_cli("eval", str(run), "--split", "test", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got == json.loads(result.stdout)  # stdout is the JSON alone: pipe it to jq
    assert got["split"] == "test" and got["metrics"]["test/examples"] > 0
    assert got["metrics"]["test/mse"] == pytest.approx(summary["metrics"]["test/mse"], rel=1e-6)
    ckpt = run_cli("eval", str(run / "checkpoints" / "step_5"))  # the step-5 checkpoint is the final model
    assert ckpt.returncode == 0, ckpt.stderr[-2000:]
    assert json.loads(ckpt.stdout[ckpt.stdout.index("{") :])["metrics"]["val/mse"] == pytest.approx(
        summary["metrics"]["val/mse"], rel=1e-6
    )


def test_eval_of_a_folder_without_a_model_is_one_line(tmp_path):
    result = run_cli("eval", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("dltrain: error: ") and "not a run directory" in result.stderr


def test_export_hf_of_the_rnn_loads_back_identical(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from dltrain.export import load_model

    run, _ = tiny_run
    result = run_cli("export", str(run), "--format", "hf", "--output-dir", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "dltrain-rnn" and "id2label" not in config  # a regression has no classes
    recipe, model = load_model(tmp_path / "hf")
    assert recipe.workload == "rnn"
    saved = load_file(str(run / "final_model" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_cnn_export_has_id2label_and_round_trips(tmp_path):
    from dltrain.export import load_model, save
    from dltrain.workload import get_workload

    recipe = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["model.hidden=16"])
    model = get_workload("cnn").build_model(recipe)
    save(model, model.state_dict(), tmp_path, recipe)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)} and config["label2id"]["7"] == 7
    back_recipe, back = load_model(tmp_path)
    assert back_recipe.model.hidden == 16
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Trackers


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_package():
    from dltrain.tracking import check_trackers

    pytest.importorskip("tensorboard")
    check_trackers(["tensorboard"])
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(RecipeError, match="pip install mlflow"):
            check_trackers(["mlflow"])
    with pytest.raises(RecipeError, match="tracking.trackers"):
        load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["tracking.trackers=[neptune]"])


def test_the_old_wandb_switch_still_works():
    on = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["tracking.trackers=[tensorboard]", "tracking.wandb=true"])
    assert on.tracking.trackers == ["tensorboard", "wandb"]
    off = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["tracking.wandb=false"])
    assert off.tracking.trackers == []
    again = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["tracking.entity=team", "tracking.group=sweep-1"])
    assert (again.tracking.entity, again.tracking.group) == ("team", "sweep-1")


def _mode(tmp_path, **env) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    code = "from dltrain.tracking import wandb_mode; print(wandb_mode())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**base, "HOME": str(tmp_path), "NETRC": str(tmp_path / ".netrc"), **env},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.long
def test_wandb_is_online_when_logged_in_to_a_self_hosted_server_and_offline_otherwise(tmp_path):
    pytest.importorskip("wandb")
    assert _mode(tmp_path) == "offline"  # no key anywhere: no prompt, no wait
    (tmp_path / ".netrc").write_text(f"machine wandb.example.org\n  login user\n  password {'a' * 40}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert _mode(tmp_path, WANDB_BASE_URL="https://wandb.example.org") == "online"
    assert _mode(tmp_path, WANDB_BASE_URL="https://wandb.example.org", WANDB_MODE="disabled") == "disabled"


# ----------------------------------------------------------------------------------------------
# Optimizer groups and schedules


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False)


def test_adamw_leaves_biases_and_layernorm_weights_undecayed_by_default():
    from dltrain.optim import build_optimizer, no_decay_names

    assert no_decay_names(_Tiny()) == {"linear.bias", "norm.weight", "norm.bias"}
    adamw = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["optim.name=adamw", "optim.weight_decay=0.5"]).optim
    model = _Tiny()
    opt = build_optimizer(adamw, model)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0 and plain["no_decay"]
    assert {id(p) for p in plain["params"]} == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay moves a weight
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"linear.weight", "head.weight"}
    off = adamw.model_copy(update={"no_decay_bias_norm": False})
    assert len(build_optimizer(off, _Tiny()).param_groups) == 1
    adam = adamw.model_copy(update={"name": "adam"})  # the rule is AdamW's default, not Adam's
    assert len(build_optimizer(adam, _Tiny()).param_groups) == 1


def _lrs(schedule: list[str], total: int = 10) -> list[float]:
    from dltrain.optim import build_scheduler

    cfg = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"schedule.{s}" for s in schedule]).schedule
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_keeps_its_numbers_and_hf_schedules_come_from_transformers():
    from transformers import get_cosine_schedule_with_warmup

    # dltrain's linear_warmup: (step + 1) / (warmup + 1) up, then linear to zero at the last step
    assert _lrs(["name=linear_warmup", "warmup_steps=3"]) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7]
    )
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, 2, 10)
    expected = []
    for _ in range(10):
        expected.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert _lrs(["name=cosine", "warmup_fraction=0.2"]) == pytest.approx(expected)
    assert _lrs(["name=constant_with_warmup", "warmup_steps=2"])[:4] == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_a_resume_that_changes_the_schedule_sets_the_new_lr_and_keeps_no_decay_groups():
    from dltrain import resume_rules
    from dltrain.optim import build_optimizer, build_scheduler

    old = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=["optim.name=adamw", "optim.weight_decay=0.1"])
    new = load_recipe(
        RECIPES / "cnn_mnist.yaml",
        overrides=["optim.name=adamw", "optim.weight_decay=0.2", "schedule.name=cosine", "optim.lr=0.5"],
    )
    opt = build_optimizer(old.optim, _Tiny())
    sched = build_scheduler(old.schedule, opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    sched_new = build_scheduler(new.schedule, opt, 10)
    sched_new.load_state_dict(sched.state_dict())  # as a resume loads the checkpoint's state
    resume_rules.apply_to_optimizer([{"key": "schedule.name"}], new, opt, sched_new)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5)  # cosine at half-way


# ----------------------------------------------------------------------------------------------
# --print-config, schema


def test_print_config_prints_the_resolved_recipe_and_exits():
    args = [str(RECIPES / "cnn_mnist.yaml"), "--profile", "cpu_test", "--set", "optim.lr=0.02"]
    result = run_cli("train", *args, "--print-config")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["optim"]["lr"] == 0.02 and printed["name"] == "cnn_mnist-cpu_test"
    assert result.stdout == dump_recipe(load_recipe(args[0], "cpu_test", ["optim.lr=0.02"]))
    assert "dltrain:" not in result.stdout  # nothing trained, nothing else printed


def test_schema_lists_every_key_with_type_default_and_meaning():
    result = run_cli("schema", "cnn")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "model.conv1_channels" in lines and "deepspeed.config_file" in lines and "profiles" not in lines
    assert "adam | adamw | sgd" in lines["optim.name"] and "[default 'adam']" in lines["optim.name"]
    assert "peak learning rate" in lines["optim.lr"]
    assert "a graph break is an error" in lines["train.compile.fullgraph"]  # a source comment as its meaning
    assert run_cli("schema", "nope").returncode == 2


# ----------------------------------------------------------------------------------------------
# Launcher settings


def test_deepspeed_config_file_from_the_recipe_wins_over_the_launchers_with_a_warning(tmp_path, monkeypatch, capsys):
    from dltrain.strategy.deepspeed import config_file_of as deepspeed_config_file

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    recipe = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"deepspeed.config_file={ds}"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "launcher.json"))
    assert deepspeed_config_file(recipe) == str(ds)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overrides the launcher's" in err
    missing = load_recipe(RECIPES / "cnn_mnist.yaml", overrides=[f"deepspeed.config_file={tmp_path / 'no.json'}"])
    with pytest.raises(RecipeError, match="cannot read it"):
        deepspeed_config_file(missing)


def test_a_recipe_precision_over_the_launchers_is_one_warning(monkeypatch, capsys):
    from dltrain.accel import warn_launcher_overrides

    recipe = load_recipe(RECIPES / "cnn_mnist.yaml")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    warn_launcher_overrides(recipe, "no")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.precision=fp32 overrides the launcher's mixed_precision=bf16" in err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # dltrain launch's own default: no warning
    warn_launcher_overrides(recipe, "bf16")
    assert capsys.readouterr().err == ""


def test_launch_passes_an_accelerate_config_file(tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n"
    )
    result = run_cli(
        "launch", str(RECIPES / "cnn_mnist.yaml"), "--profile", "cpu_test", "--config_file", str(config), "--dry-run"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--config_file {config}" in result.stdout and "--mixed_precision" not in result.stdout
    missing = run_cli(
        "launch", str(RECIPES / "cnn_mnist.yaml"), "--config_file", str(tmp_path / "no.yaml"), "--dry-run"
    )
    assert missing.returncode == 2 and "--config_file" in missing.stderr


# ----------------------------------------------------------------------------------------------
# The architecture graph


def test_inspect_draws_the_architecture_graph_with_torchviz(tmp_path):
    import importlib.util

    from dltrain.inspect import inspect

    if shutil.which("dot") is None or importlib.util.find_spec("torchviz") is None:
        message = "graphviz `dot` or torchviz missing (pip install 'dltrain[viz]'; apt-get install graphviz)"
        if os.environ.get("DLTRAIN_REQUIRE_DATA", "") not in ("", "0"):
            pytest.fail(message + " (CI installs both: DLTRAIN_REQUIRE_DATA=1)")
        pytest.skip(message)
    recipe = load_recipe(RECIPES / "rnn_sine.yaml", "cpu_test")
    result = inspect(recipe, tmp_path)
    assert result["graph"] == tmp_path / "architecture.png"
    assert result["graph"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["graph"].stat().st_size > 5_000
