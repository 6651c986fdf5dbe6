"""The files dltrain ships beside its code, found through the package, never through a checkout.

The repository keeps them at the top level (recipes/, benchmarks/suites/, benchmarks/baselines/,
launch/); inside the package they are `dltrain/recipes`, `dltrain/suites`, `dltrain/baselines` and
`dltrain/launch_configs`: in a checkout those are symbolic links to the top-level folders (so a
checkout on PYTHONPATH and an editable install see the files being edited), in a wheel real folders
(setuptools copies the files behind the links: `package-data` in pyproject.toml).

    dltrain train cnn_mnist                   # a shipped recipe by name
    dltrain train recipes/cnn_mnist.yaml      # a path; from outside a checkout, the shipped one
    dltrain bench cpu_quick                   # a shipped suite by name
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import dltrain

# Each kind of shipped file: its folder inside the package, and where it lives in the repository
# (the paths suites and the README write).
KINDS = {"recipes": "recipes", "suites": "suites", "baselines": "baselines", "launch": "launch_configs"}
_REPO_FOLDERS = {
    "recipes": "recipes",
    "suites": "benchmarks/suites",
    "baselines": "benchmarks/baselines",
    "launch": "launch",
}


def folder(kind: str) -> Path:
    """The shipped folder of `kind` (recipes, suites, baselines, launch) as a file-system path:
    baselines run as scripts and sbatch takes a path, so a zipped install is not supported."""
    return Path(os.fspath(importlib.resources.files("dltrain") / KINDS[kind]))


def recipes_dir() -> Path:
    """The recipes `dltrain list` shows: DLTRAIN_RECIPES_DIR, else the shipped ones."""
    return Path(os.environ["DLTRAIN_RECIPES_DIR"]) if os.environ.get("DLTRAIN_RECIPES_DIR") else folder("recipes")


def names(kind: str) -> list[str]:
    """The stems of the shipped YAML files of `kind`, sorted (for error messages and `dltrain list`)."""
    where = folder(kind)
    return sorted(p.stem for p in where.glob("*.yaml")) if where.is_dir() else []


def resolve(name_or_path: str | Path, kind: str = "recipes") -> Path:
    """A YAML file given as a path or as the name of a shipped one.

    An existing file is taken as it is (a folder of that name, e.g. a run directory, is not).
    Otherwise a bare name (`cnn_mnist`) or a path written relative to the repository
    (`recipes/cnn_mnist.yaml`, `benchmarks/suites/cpu_quick.yaml`, as suites and the README write
    them) is the shipped file of that name when there is one. Anything else comes back unchanged,
    for the caller's "not found" error.
    """
    path = Path(name_or_path)
    if path.is_file() or path.is_absolute():
        return path
    if len(path.parts) == 1 and not path.suffix:
        candidate = folder(kind) / f"{path.name}.yaml"
    elif path.parent == Path(_REPO_FOLDERS[kind]) and path.suffix in (".yaml", ".yml"):
        candidate = folder(kind) / path.name
    else:
        return path
    return candidate if candidate.is_file() else path


def import_root() -> Path:
    """The sys.path entry this dltrain was imported from (a checkout, site-packages, a --target
    folder): child processes (bench jobs, baselines) get it on PYTHONPATH, so they run this same
    dltrain and not another one installed elsewhere."""
    return Path(dltrain.__path__[0]).resolve().parent
