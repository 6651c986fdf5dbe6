"""dltrain as an installed package: the wheel works from any directory, shipped files resolve by
name, a missing extra is one line, DeepSpeed stays out of runs that do not ask for it, and
`dltrain launch` refuses at start-up what would fail in every rank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, REPO
from dltrain import shipped
from dltrain.cli import main
from dltrain.recipe import RecipeError

# The source a wheel is built from: the package and the top-level folders it ships (symlinked
# into dltrain/), plus what pyproject.toml reads.
WHEEL_SOURCE = [
    "pyproject.toml",
    "README.md",
    "dltrain",
    "recipes",
    "launch",
    "benchmarks/suites",
    "benchmarks/baselines",
]


def test_shipped_files_resolve_by_name_and_as_repository_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: relative paths do not exist here
    assert shipped.resolve("cnn_mnist") == shipped.folder("recipes") / "cnn_mnist.yaml"
    assert shipped.resolve("recipes/rnn_sine.yaml") == shipped.folder("recipes") / "rnn_sine.yaml"
    assert shipped.resolve("cpu_quick", "suites").is_file()
    assert shipped.resolve("benchmarks/suites/ttt.yaml", "suites").is_file()
    assert shipped.resolve("no_such_recipe") == Path("no_such_recipe")  # left for the caller's "not found"
    (tmp_path / "rnn_sine").mkdir()  # a folder of that name (a run directory) is not a recipe
    assert shipped.resolve("rnn_sine") == shipped.folder("recipes") / "rnn_sine.yaml"
    (tmp_path / "cnn_mnist").write_text("workload: rnn\n")  # an existing file wins over a shipped name
    assert shipped.resolve("cnn_mnist") == Path("cnn_mnist")
    assert (shipped.folder("baselines") / "cnn_bare.py").is_file()
    assert (shipped.folder("launch") / "slurm.sbatch").is_file()
    assert sorted(p.name for p in shipped.folder("recipes").glob("*.yaml")) == sorted(
        p.name for p in RECIPES.glob("*.yaml")
    )


def test_a_suite_outside_the_repository_finds_recipes_by_name_and_repository_path(tmp_path, monkeypatch):
    from dltrain.bench.suite import load_suite

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(
        "throughput_steps: 10\nentries:\n  - {name: a, recipe: cnn_mnist, profile: cpu_test}\n"
        "  - {name: b, recipe: recipes/rnn_sine.yaml, profile: cpu_test}\n"
    )
    suite = load_suite("mine.yaml")
    assert [Path(e.recipe).name for e in suite.entries] == ["cnn_mnist.yaml", "rnn_sine.yaml"]
    assert all(Path(e.recipe).is_absolute() and Path(e.recipe).is_file() for e in suite.entries)
    with pytest.raises(RecipeError, match="shipped suites: .*cpu_quick"):
        load_suite("no_such_suite")


@pytest.mark.parametrize(
    "hidden, recipe, extra", [("torchvision", "cnn_mnist", "vision"), ("transformers", "bert_sst2", "nlp")]
)
def test_a_workload_whose_extra_is_missing_says_which_to_install(hidden, recipe, extra, tmp_path):
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = (
        f"import sys; sys.modules[{hidden!r}] = None; from dltrain.cli import main; "
        f"sys.exit(main(['train', {recipe!r}, '--profile', 'cpu_test', '--output-dir', {str(tmp_path / 'run')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"dltrain: error: the {recipe.split('_')[0]} workload needs {hidden}, which is not installed: "
        f"pip install 'dltrain[{extra}]'"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_lazy_import_of_a_missing_extra_is_one_line_not_a_traceback(capsys, monkeypatch):
    from dltrain import cli

    def cmd(args):
        import matplotlib.pyplot  # noqa: F401 - stands for any lazy import deep inside a command

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(cli.COMMANDS, "list", cmd)
    assert main(["list"]) == 2
    assert capsys.readouterr().err == (
        "dltrain: error: matplotlib is not installed (the 'plots' extra): pip install 'dltrain[plots]'\n"
    )


def test_launch_refuses_a_global_batch_the_world_size_does_not_divide_before_starting(capsys):
    # The README's old SLURM example: bert_sst2's global batch 16 on 4 nodes x 8 GPUs (the new one
    # runs through the script in test_launch.py).
    assert main(["launch", "--nproc", "8", "--nnodes", "4", "--master", "node1:29500", "--dry-run", "bert_sst2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("dltrain: error: train.global_batch_size=16 is not divisible by world size 32")
    assert (
        main(
            [
                "launch",
                "--nproc",
                "8",
                "--nnodes",
                "4",
                "--master",
                "node1:29500",
                "--dry-run",
                "bert_sst2",
                "--set",
                "train.global_batch_size=256",
            ]
        )
        == 0
    )
    assert "--num_processes 32" in capsys.readouterr().out


def test_launch_refuses_fp16_on_a_cpu_before_starting(capsys):
    assert main(["launch", "--cpu", "--nproc", "2", "--dry-run", "cnn_mnist", "--set", "train.precision=fp16"]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the source (the build writes build/ and *.egg-info beside it)."""
    src = tmp_path / "src"
    for rel in WHEEL_SOURCE:
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, src / rel, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("dltrain-*.whl")
    return wheel


@pytest.mark.long
def test_the_wheel_installs_and_trains_from_outside_the_repository(tmp_path, data_dir):
    wheel = _build_wheel(tmp_path)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy on the path (the venv gives the dependencies); no checkout anywhere.
    env = {**os.environ, "PYTHONPATH": str(target), "DLTRAIN_DATA_DIR": str(data_dir)}
    env.pop("DLTRAIN_RECIPES_DIR", None)

    def dltrain(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(target / "bin" / "dltrain"), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=elsewhere,
            timeout=300,
        )

    where = dltrain("list", "--where", "recipes")
    assert where.stdout.strip() == str(target / "dltrain" / "recipes")  # the installed copy, not the checkout
    listed = dltrain("list")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == sorted(
        p.name for p in RECIPES.glob("*.yaml")
    )
    run = dltrain("train", "cnn_mnist", "--profile", "cpu_test", "--set", "train.max_steps=5", "--output-dir", "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"dltrain: done in [\d.]+ s; test/accuracy 0\.\d+", run.stdout)
    assert (elsewhere / "run" / "summary.json").is_file() and (
        elsewhere / "run" / "final_model" / "model.safetensors"
    ).is_file()
    # DeepSpeed is installed here but this run does not use it: not imported, so none of its log lines.
    assert "DeepSpeed" not in run.stdout + run.stderr and "Setting accelerator" not in run.stdout + run.stderr
