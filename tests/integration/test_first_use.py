"""What a new user tripped on (issue 21): each test shows one fault, fixed.

These tests train nothing: a run directory is built by hand where a test needs one.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

# ----------------------------------------------------------------------------------------------
# A fast CLI: the commands that only read files do not import torch


def _imports_torch(argv: list[str]) -> tuple[bool, str]:
    """(was torch imported, stdout) after `dltrain ARGV` in a fresh interpreter."""
    code = (
        "import sys\nfrom dltrain.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip().endswith("TORCH True"), done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "--where", "launch"], ["train", "--help"]])
def test_help_and_list_do_not_import_torch(argv):
    imported, out = _imports_torch(argv)
    assert out.strip(), "the command printed nothing"
    assert not imported, f"`dltrain {' '.join(argv)}` imported torch"


def test_the_torch_check_sees_a_command_that_imports_torch():
    # The check above can fail: `schema cnn` builds the CNN's recipe class, whose module imports torch.
    imported, _ = _imports_torch(["schema", "cnn"])
    assert imported


# ----------------------------------------------------------------------------------------------
# inspect names what is missing for the architecture graph


def test_inspect_names_dot_when_only_graphviz_is_missing(monkeypatch):
    from dltrain import inspect as dl_inspect

    spec = importlib.util.spec_from_loader("torchviz", loader=None)
    monkeypatch.setattr(dl_inspect.importlib.util, "find_spec", lambda name: spec if name == "torchviz" else None)
    monkeypatch.setattr(dl_inspect.shutil, "which", lambda name: None)
    path, note = dl_inspect._graph(None, None, REPO)
    assert path is None
    assert "`dot`" in note and "graphviz" in note
    assert "torchviz" not in note  # it is installed: do not tell the user to install it


def test_inspect_names_torchviz_when_only_torchviz_is_missing(monkeypatch):
    from dltrain import inspect as dl_inspect

    monkeypatch.setattr(dl_inspect.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(dl_inspect.shutil, "which", lambda name: "/usr/bin/dot")
    assert dl_inspect.graph_tools_missing() == ["the torchviz package is not installed (pip install 'dltrain[viz]')"]


# ----------------------------------------------------------------------------------------------
# Export and eval follow the run: what it saved, in a stated order


def _cnn_run(tmp_path, saved: tuple[str, ...]):
    """A CNN run directory by hand (no training): recipe.yaml and the model folders in `saved`
    ("final", "best", or "step_N" for a checkpoint holding model weights)."""
    import json

    import torch

    from dltrain import export
    from dltrain.data import sha256_of
    from dltrain.recipe import dump_recipe, load_recipe
    from dltrain.workload import get_workload

    recipe = load_recipe(REPO / "recipes" / "cnn_mnist.yaml", "cpu_test")
    torch.manual_seed(0)
    model = get_workload("cnn").build_model(recipe)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    for name in saved:
        if name.startswith("step_"):
            ckpt = run / "checkpoints" / name
            export.save(model, model.state_dict(), ckpt, recipe)
            state = {"recipe": dump_recipe(recipe), "state": {"step": int(name[5:])}, "run_id": "fake"}
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
            files = {f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)} for f in ckpt.iterdir()}
            (ckpt / "manifest.json").write_text(json.dumps({"files": files}))
        else:
            export.save(model, model.state_dict(), run / f"{name}_model", recipe)
    return run


@pytest.mark.parametrize(
    "saved, taken",
    [
        (("final", "best", "step_4"), "final_model"),
        (("best", "step_4"), "best_model"),
        (("step_2", "step_4"), "checkpoints/step_4"),
    ],
)
def test_export_takes_what_the_run_saved_in_order_final_best_checkpoint(tmp_path, saved, taken):
    from dltrain.export import locate

    run = _cnn_run(tmp_path, saved)
    _, folder = locate(run)
    assert folder == run / taken


def test_the_readme_export_of_a_run_that_saved_only_best_model_works(tmp_path):
    # bert_sst2_minilm.yaml saved best_model/ alone, and `dltrain export RUN --format hf` said the
    # run had no final_model.
    from conftest import run_cli

    run = _cnn_run(tmp_path, ("best",))
    done = run_cli("export", str(run), "--format", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"exported {run / 'best_model'} -> {run / 'export-hf'}" in done.stdout
    assert (run / "export-hf" / "model.safetensors").is_file()


def test_asking_for_a_model_the_run_did_not_save_names_what_it_saved(tmp_path):
    from dltrain.export import locate
    from dltrain.recipe import RecipeError

    run = _cnn_run(tmp_path, ("best", "step_4"))
    with pytest.raises(RecipeError) as err:
        locate(run, "final")
    assert "the run saved: best_model/, checkpoints/step_4" in str(err.value)
    assert "leave --which out" in str(err.value)


def test_a_run_that_saved_no_model_says_so(tmp_path):
    from dltrain.export import locate
    from dltrain.recipe import RecipeError

    run = _cnn_run(tmp_path, ())
    with pytest.raises(RecipeError, match="holds no model: no final_model/, best_model/ or checkpoint"):
        locate(run)


def test_the_exported_weights_get_the_umask_mode_like_every_other_file(tmp_path):
    import os

    from conftest import run_cli

    run = _cnn_run(tmp_path, ("final",))
    old = os.umask(0o022)  # the child inherits it
    try:
        done = run_cli("export", str(run), cwd=tmp_path)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (run / "export-hf").iterdir()}
    assert modes == {"config.json": "0o644", "model.safetensors": "0o644", "recipe.yaml": "0o644"}


# ----------------------------------------------------------------------------------------------
# Data paths are stored resolved; eval reads only the split it evaluates


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    from dltrain.recipe import dump_recipe, load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        REPO / "recipes" / "bert_sst2_minilm.yaml",
        "cpu_test",
        ["data.train_file=train.csv", "data.eval_file=data/dev.csv", "data.test_file=../test.csv"],
    )
    dumped = dump_recipe(recipe)
    assert f"train_file: {tmp_path / 'train.csv'}" in dumped
    assert f"eval_file: {tmp_path / 'data' / 'dev.csv'}" in dumped
    assert f"test_file: {tmp_path.parent / 'test.csv'}" in dumped
    cnn = load_recipe(REPO / "recipes" / "cnn_mnist.yaml", "cpu_test", ["data.root=mnist"])
    assert cnn.data.root == str(tmp_path / "mnist")


@pytest.mark.long
def test_eval_from_another_directory_needs_only_the_split_it_evaluates(tmp_path, minilm_dir, monkeypatch):
    # The CSV run trained in its own folder with data.train_file=train.csv; `dltrain eval RUN` from
    # elsewhere said "data file not found: train.csv (data.train_file)".
    import json

    from conftest import run_cli
    from dltrain import export
    from dltrain.recipe import dump_recipe, load_recipe
    from dltrain.workload import get_workload

    where = tmp_path / "project"
    where.mkdir()
    pairs = [("goal", "sports"), ("soup", "food"), ("song", "music")] * 4
    rows = "text,topic\n" + "".join(f"{w} {w} {w},{t}\n" for w, t in pairs)
    (where / "train.csv").write_text(rows)
    (where / "dev.csv").write_text(rows)
    monkeypatch.chdir(where)
    recipe = load_recipe(
        REPO / "recipes" / "bert_sst2_minilm.yaml",
        "cpu_test",
        [
            f"model.name_or_path={minilm_dir}",
            "data.train_file=train.csv",
            "data.eval_file=dev.csv",
            "data.text_column=text",
            "data.label_column=topic",
            "data.label_names=[food,music,sports]",
            "data.train_subset=null",
            "data.eval_subset=null",
        ],
    )
    model = get_workload("bert").build_model(recipe)
    run = where / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    export.save(model, model.state_dict(), run / "best_model", recipe)
    (where / "train.csv").unlink()  # evaluation must not need it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli(
        "eval", str(run), "--which", "best", cwd=elsewhere, env={"DLTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["metrics"]["val/examples"] == 12 and result["model"] == str(run / "best_model")


# ----------------------------------------------------------------------------------------------
# The best model on a tie; the text recipes save the final model


def test_a_tie_on_the_target_metric_keeps_the_later_model(monkeypatch, tmp_path):
    # Dev accuracy tied at 1.0 from the first evaluation; best_model/ kept that first model.
    from types import SimpleNamespace

    from dltrain import trainer
    from dltrain.recipe import load_recipe

    evals = iter(
        [
            {"val/accuracy": 0.5, "val/loss": 1.0},
            {"val/accuracy": 1.0, "val/loss": 0.78},
            {"val/accuracy": 1.0, "val/loss": 0.36},
            {"val/accuracy": 0.9, "val/loss": 0.30},
        ]
    )
    saved_at = []
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: dict(next(evals)))
    monkeypatch.setattr(trainer, "print_eval", lambda *a, **k: None)
    monkeypatch.setattr(trainer.export, "from_loop", lambda loop, out: saved_at.append(state.step))
    recipe = load_recipe(REPO / "recipes" / "bert_sst2_minilm.yaml", overrides=["target.value=2"])
    loop = SimpleNamespace(
        recipe=recipe,
        model=None,
        data=SimpleNamespace(val=None),
        workload=None,
        accelerator=None,
        plan=SimpleNamespace(micro_batch=1),
        steps_per_epoch=10,
        run_dir=tmp_path,
        log=SimpleNamespace(log=lambda *a: None),
        t_start=0.0,
    )
    state = trainer.TrainState()
    for step in (10, 20, 30, 40):
        state.step = step
        trainer.run_eval(loop, state)
    assert saved_at == [10, 20, 30]  # 30 ties 20 at 1.0: the later one is kept; 40 is worse
    assert state.best == 1.0


@pytest.mark.parametrize("name", ["bert_sst2.yaml", "bert_sst2_minilm.yaml"])
def test_the_text_recipes_save_the_final_model(name):
    from dltrain.recipe import load_recipe

    assert load_recipe(REPO / "recipes" / name).checkpoint.save_final_model


# ----------------------------------------------------------------------------------------------
# Say what is happening: W&B offline, a suite's W&B switch


class _WandbOnlyAccelerator:
    """What RunLog asks of an Accelerator, with a real offline W&B run behind init_trackers."""

    is_main_process = True
    trackers: list = []

    def __init__(self):
        from types import SimpleNamespace

        self.project_configuration = SimpleNamespace(logging_dir=None)
        self.run = None

    def init_trackers(self, project, config=None, init_kwargs=None):
        import wandb

        self.run = wandb.init(project=project, **init_kwargs["wandb"])

    def get_tracker(self, name, unwrap=False):
        return self.run


def test_an_offline_wandb_run_says_where_it_went_and_how_to_upload_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from dltrain.recipe import load_recipe
    from dltrain.tracking import RunLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = load_recipe(REPO / "recipes" / "cnn_mnist.yaml", "cpu_test", ["tracking.trackers=[wandb]"])
    acc = _WandbOnlyAccelerator()
    RunLog(acc, tmp_path, recipe)
    acc.run.finish()
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    assert out == [f"  W&B run (offline): {folders[0]}; upload it with `wandb sync {folders[0]}`"]


def test_a_suite_leaves_wandb_to_the_recipe_unless_it_says_it_overrides_it():
    # A suite's default wandb_runs: true turned W&B on for a plugin recipe with `trackers: []`.
    from dltrain.bench.suite import Suite, expand

    entry = {"name": "cnn", "recipe": str(REPO / "recipes" / "cnn_mnist.yaml"), "profile": "cpu_test"}
    for wandb_runs, expected in ((None, []), (True, ["tracking.wandb=true"]), (False, ["tracking.wandb=false"])):
        switch = {} if wandb_runs is None else {"wandb_runs": wandb_runs}
        suite = Suite.model_validate({"name": "t", "entries": [entry]} | switch)
        sets = expand(suite)[0].sets
        assert [s for s in sets if s.startswith("tracking.wandb")] == expected, wandb_runs


# ----------------------------------------------------------------------------------------------
# bf16 on a CPU without bf16 units: warned once

AVX2_CPU = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n\nprocessor\t: 1\n"
BF16_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_CPU = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_bf16_units_are_read_from_the_cpu_flags():
    from dltrain.peaks import cpu_has_bf16_units

    assert cpu_has_bf16_units(AVX2_CPU) is False
    assert cpu_has_bf16_units(BF16_CPU) is True
    assert cpu_has_bf16_units(ARM_CPU) is True
    assert cpu_has_bf16_units("") is None  # no flags line: nothing claimed, no warning


def test_bf16_on_a_cpu_without_bf16_units_warns_once_naming_it(monkeypatch, capsys):
    import torch

    from dltrain import peaks

    monkeypatch.setattr(peaks, "_BF16_WARNED", False)
    real = peaks.cpu_has_bf16_units
    monkeypatch.setattr(peaks, "cpu_has_bf16_units", lambda cpuinfo=None: real(AVX2_CPU))
    monkeypatch.setattr(peaks, "_CPU_PEAKS", {"bf16": 1e9, "fp32": 1e9})  # no matmul measured
    monkeypatch.delenv("RANK", raising=False)
    cpu = torch.device("cpu")
    for _ in range(3):  # a run asks for its peak once; dltrain.train twice in a process asks again
        peaks.peak_flops(cpu, "bf16")
    peaks.peak_flops(cpu, "fp32")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dltrain: warning: train.precision=bf16 on a CPU without bf16 units")
    assert "train.precision=fp32" in lines[0]


def test_bf16_on_a_cpu_with_bf16_units_says_nothing(monkeypatch, capsys):
    import torch

    from dltrain import peaks

    monkeypatch.setattr(peaks, "_BF16_WARNED", False)
    real = peaks.cpu_has_bf16_units
    monkeypatch.setattr(peaks, "cpu_has_bf16_units", lambda cpuinfo=None: real(BF16_CPU))
    monkeypatch.setattr(peaks, "_CPU_PEAKS", {"bf16": 1e9})
    peaks.peak_flops(torch.device("cpu"), "bf16")
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# Shipped files point only inside the package


def test_no_shipped_file_points_to_notes_users_do_not_have():
    shipped = [
        p
        for top in ("dltrain", "launch", "recipes", "benchmarks/suites", "benchmarks/baselines", "examples")
        for p in (REPO / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert len(shipped) > 50  # the walk found the package
    pointing = [
        str(p.relative_to(REPO))
        for p in shipped
        if any(s in p.read_text(errors="replace") for s in ("ENV-NOTES", "../shared"))
    ]
    assert pointing == []


# ----------------------------------------------------------------------------------------------
# Building the wheel leaves the checkout as it was


def test_make_wheel_builds_the_wheel_and_leaves_the_checkout_clean(tmp_path):
    import shutil
    import zipfile

    checkout = tmp_path / "checkout"
    for rel in (
        "Makefile",
        "pyproject.toml",
        "README.md",
        "dltrain",
        "recipes",
        "launch",
        "benchmarks/suites",
        "benchmarks/baselines",
    ):
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, checkout / rel, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            checkout.mkdir(exist_ok=True)
            shutil.copy2(REPO / rel, checkout / rel)
    before = sorted(p.name for p in checkout.iterdir())
    done = subprocess.run(
        ["make", "wheel", f"PYTHON={sys.executable}", "WHEEL_FLAGS=--no-build-isolation"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in checkout.iterdir()) == sorted([*before, "dist"])  # no build/, no dltrain.egg-info/
    (wheel,) = (checkout / "dist").glob("dltrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dltrain/recipes/cnn_mnist.yaml" in names and "dltrain/cli.py" in names
