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
    code = ("import sys\nfrom dltrain.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
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
