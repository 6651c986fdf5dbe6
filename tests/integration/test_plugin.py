"""Bring your own workload: the registry, the entry-point group, and the example plugin in
examples/blobs_plugin installed as a user would install it and trained through the entry point."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PLUGIN = REPO / "examples" / "blobs_plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The example plugin installed into a throwaway target (no dependencies: dltrain and torch are
    this environment's), built from a copy so the checkout gets no build/ or egg-info."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN, src)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert list(target.glob("dltrain_blobs_plugin-*.dist-info/entry_points.txt"))
    return target


@pytest.mark.long
def test_example_plugin_trains_end_to_end_through_its_entry_point(plugin_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO)])}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dltrain",
            "train",
            str(PLUGIN / "blobs.yaml"),
            "--profile",
            "cpu_test",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workload"] == "blobs" and summary["steps"] == 30
    assert summary["metrics"]["val/accuracy"] > 0.9  # well-separated blobs: 0.33 is chance
    assert summary["flops_per_sample"] == 3 * 2 * (8 * 64 + 64 * 64 + 64 * 3)
    # Without the plugin on the path, the same recipe names an unknown workload, in one line.
    bare = subprocess.run(
        [sys.executable, "-m", "dltrain", "train", str(PLUGIN / "blobs.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
        cwd=tmp_path,
    )
    assert bare.returncode == 2 and "unknown workload 'blobs'" in bare.stderr and "dltrain.workloads" in bare.stderr


def _blobs_module(monkeypatch, name: str = "blobs_plugin_src"):
    """The example's module, imported from its source (no install): register_workload's case."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PLUGIN / "src" / "blobs_plugin" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # pydantic resolves the annotations through it
    spec.loader.exec_module(module)
    return module


def test_register_workload_adds_a_recipe_schema_and_refuses_mistakes(monkeypatch):
    from dltrain import workload as registry
    from dltrain.recipe import RecipeError, validate

    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))  # this test's registrations end with it
    blobs = _blobs_module(monkeypatch).WORKLOAD
    import dltrain

    dltrain.register_workload("blobs", blobs)
    assert "blobs" in registry.workload_names() and registry.get_workload("blobs") is blobs
    recipe = validate({"workload": "blobs", "name": "b", "data": {"classes": 5}})
    assert recipe.data.classes == 5
    with pytest.raises(RecipeError, match="unknown key 'data.clases'"):
        validate({"workload": "blobs", "name": "b", "data": {"clases": 5}})
    with pytest.raises(RecipeError, match="not a metric the blobs workload reports"):
        validate({"workload": "blobs", "name": "b", "target": {"metric": "val/mse"}})
    with pytest.raises(ValueError, match="already registered"):
        dltrain.register_workload("blobs", _blobs_module(monkeypatch, "blobs_again").WORKLOAD)
    with pytest.raises(TypeError, match="takes workload 'blobs', not 'other'"):
        dltrain.register_workload("other", blobs)
    with pytest.raises(TypeError, match="takes a dltrain.Workload"):
        dltrain.register_workload("blobs", object(), replace=True)
    with pytest.raises(TypeError, match="must be callable"):
        dltrain.Workload(
            recipe=blobs.recipe,
            build_model=None,
            build_data=blobs.build_data,
            forward=blobs.forward,
            flops_per_sample=blobs.flops_per_sample,
        )


def test_a_broken_entry_point_is_one_line_naming_it(monkeypatch):
    from importlib.metadata import EntryPoint

    from dltrain import workload as registry
    from dltrain.recipe import RecipeError

    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))
    eps = {
        "ghost": EntryPoint("ghost", "no_such_package.mod:WORKLOAD", registry.ENTRY_POINT_GROUP),
        "notone": EntryPoint("notone", "json:dumps", registry.ENTRY_POINT_GROUP),
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    assert {"ghost", "notone"} <= set(registry.workload_names())
    with pytest.raises(RecipeError, match="'ghost' .*no_such_package.mod:WORKLOAD.* cannot be imported"):
        registry.get_workload("ghost")
    with pytest.raises(RecipeError, match="not a dltrain.Workload"):
        registry.get_workload("notone")


def test_the_core_names_no_workload():
    """Only dltrain/workloads/ (and the registry's table of built-ins) knows which workloads
    exist: no other module imports them or compares against their names."""
    from dltrain.workloads import BUILTIN

    offenders = []
    for path in sorted((REPO / "dltrain").rglob("*.py")):
        rel = path.relative_to(REPO / "dltrain").as_posix()
        if rel.startswith("workloads/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dltrain.workloads"):
                if not (rel == "workload.py" and [a.name for a in node.names] == ["BUILTIN"]):
                    offenders.append(f"{rel}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Constant) and node.value in BUILTIN:
                offenders.append(f"{rel}:{node.lineno} names {node.value!r}")
    assert not offenders, offenders


def test_the_recipe_schema_and_the_package_import_no_workload():
    """recipe.py asks the registry for a workload's schema when a recipe names it: importing
    dltrain or dltrain.recipe imports no workload module (nor torch), and validating a CNN recipe
    imports the CNN's module alone."""
    code = (
        "import sys, dltrain, dltrain.recipe\n"
        "loaded = lambda: sorted(m for m in sys.modules if m.startswith('dltrain.workloads.') or m == 'torch')\n"
        "before = loaded()\n"
        f"dltrain.recipe.load_recipe({str(REPO / 'recipes' / 'cnn_mnist.yaml')!r})\n"
        "print(before, loaded())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "['dltrain.workloads.cnn',", "'torch']"], done.stdout


# ----------------------------------------------------------------------------------------------
# The plug-in types: each Workload function against its Protocol


def test_the_example_plugin_follows_the_workload_signatures(monkeypatch):
    from dltrain.plugin import SIGNATURES, signature_problem

    workload = _blobs_module(monkeypatch).WORKLOAD
    checked = {
        name: signature_problem(getattr(workload, name), protocol)
        for name, protocol in SIGNATURES.items()
        if getattr(workload, name) is not None
    }
    assert set(checked) >= {"build_model", "build_data", "forward", "flops_per_sample", "summarize"}
    assert all(problem is None for problem in checked.values()), checked


@pytest.mark.parametrize("name", ["cnn", "rnn", "bert"])
def test_the_built_in_workloads_follow_the_workload_signatures(name):
    from dltrain.plugin import SIGNATURES, signature_problem
    from dltrain.workload import get_workload

    workload = get_workload(name)
    problems = {
        field: signature_problem(getattr(workload, field), protocol)
        for field, protocol in SIGNATURES.items()
        if getattr(workload, field) is not None
    }
    assert {k: v for k, v in problems.items() if v} == {}


def test_a_function_with_the_wrong_signature_is_refused_when_the_workload_is_built(monkeypatch):
    import dataclasses

    from dltrain.plugin import Workload

    good = _blobs_module(monkeypatch).WORKLOAD
    fields = {f.name: getattr(good, f.name) for f in dataclasses.fields(good) if f.init and f.name != "name"}
    with pytest.raises(
        TypeError,
        match=r"Workload.build_data \(one_arg\) takes 1 positional arguments; it is "
        r"called with \(recipe, device\): see dltrain.workload.BuildData",
    ):
        Workload(**fields | {"build_data": _named("one_arg", lambda recipe: None)})
    with pytest.raises(TypeError, match=r"Workload.forward \(three\) requires 3 arguments"):
        Workload(**fields | {"forward": _named("three", lambda model, batch, extra: None)})
    with pytest.raises(TypeError, match=r"requires keyword argument scale"):
        Workload(**fields | {"summarize": _named("kw", lambda sums, *, scale: None)})
    Workload(**fields | {"write_samples": lambda recipe, out_dir, n=12: []})  # extra parameters with defaults: fine


def _named(name: str, fn):
    fn.__name__ = name
    return fn


def test_load_model_returns_the_recipe_and_the_model(tmp_path):
    # The README implied the model alone.
    import torch

    from dltrain import export
    from dltrain.recipe import load_recipe
    from dltrain.workload import get_workload

    recipe = load_recipe(REPO / "recipes" / "rnn_sine.yaml", "cpu_test")
    model = get_workload("rnn").build_model(recipe)
    export.save(model, model.state_dict(), tmp_path / "m", recipe)
    loaded_recipe, loaded = export.load_model(tmp_path / "m")
    assert loaded_recipe.workload == "rnn" and isinstance(loaded, torch.nn.Module) and not loaded.training


# ----------------------------------------------------------------------------------------------
# Broken plugins (issue 22, item 11): named in one line; the other workloads keep working


@pytest.mark.parametrize(
    "body, message",
    [
        ("raise RuntimeError('no GPU driver found')", "importing it raised RuntimeError: no GPU driver found"),
        ("def broken(:\n    pass", "importing it raised SyntaxError"),
        ("import sys\nsys.exit(0)", "importing it raised SystemExit"),
    ],
)
def test_a_plugin_that_fails_while_imported_is_one_line_and_others_still_work(
    monkeypatch, tmp_path, capsys, body, message
):
    from importlib.metadata import EntryPoint

    from dltrain import cli
    from dltrain import workload as registry
    from dltrain.recipe import RecipeError

    module = f"broken_plugin_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{module}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))
    eps = {"broken": EntryPoint("broken", f"{module}:WORKLOAD", registry.ENTRY_POINT_GROUP)}
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    with pytest.raises(RecipeError, match=re.escape(message)):
        registry.get_workload("broken")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workload: broken\n")
    assert cli.main(["train", str(recipe)]) == 2  # was exit 0 and no output for sys.exit(0) at import
    assert "importing it raised" in capsys.readouterr().err
    assert cli.main(["schema"]) == 0  # every other workload's schema is still shown
    out, err = capsys.readouterr()
    assert "train.global_batch_size" in out and "workload 'broken'" in err


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("colon", ":WORKLOAD", "is not 'package.module:ATTRIBUTE'"),
        ("bad-name", "blobs_plugin_src:WORKLOAD", "cannot be used: a workload name is an identifier"),
        ("other", "blobs_plugin_src:WORKLOAD", "cannot be used: workload 'other': its recipe class"),
    ],
)
def test_a_plugin_declared_wrongly_is_one_line(monkeypatch, name, value, message):
    from importlib.metadata import EntryPoint

    from dltrain import workload as registry
    from dltrain.recipe import RecipeError

    _blobs_module(monkeypatch)
    monkeypatch.setattr(registry, "_LOADED", dict(registry._LOADED))
    monkeypatch.setattr(registry, "_entry_points", lambda: {name: EntryPoint(name, value, registry.ENTRY_POINT_GROUP)})
    with pytest.raises(RecipeError, match=re.escape(message)):
        registry.get_workload(name)


def test_a_plugin_named_like_a_built_in_workload_is_not_used_and_says_so(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from dltrain import workload as registry

    clash = EntryPoint("cnn", "blobs_plugin_src:WORKLOAD", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [clash])
    monkeypatch.setattr(registry, "_WARNED", set())
    assert "cnn" not in registry._entry_points()
    registry._entry_points()
    err = capsys.readouterr().err
    assert err.count("names a built-in workload and is not used") == 1, err
