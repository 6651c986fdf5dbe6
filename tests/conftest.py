"""Shared fixtures: where the real data is, and how to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def _shared() -> Path:
    return REPO.parent / "shared"


def need(path: Path, what: str) -> Path:
    """Real data a test needs: a failure in CI (DLTRAIN_REQUIRE_DATA=1), a skip elsewhere."""
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if os.environ.get("DLTRAIN_REQUIRE_DATA", "") not in ("", "0"):
        pytest.fail(message + " (DLTRAIN_REQUIRE_DATA=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("DLTRAIN_DATA_DIR", _shared() / "data"))
    return need(root / "MNIST" / "raw", "MNIST").parent.parent


@pytest.fixture(scope="session")
def sst2_dir(data_dir_any) -> Path:
    return need(data_dir_any / "sst2" / "train.tsv", "SST-2").parent


@pytest.fixture(scope="session")
def data_dir_any() -> Path:
    return Path(os.environ.get("DLTRAIN_DATA_DIR", _shared() / "data"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    root = Path(os.environ.get("DLTRAIN_MODELS_DIR", _shared() / "models"))
    return need(root / "all-MiniLM-L6-v2" / "config.json", "all-MiniLM-L6-v2").parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """Tests never touch the user's cache or W&B account."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ.setdefault("DLTRAIN_CACHE_DIR", str(cache))
    os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """An in-process W&B run (e.g. the bench summary) leaves WANDB_SERVICE in os.environ; child
    processes would then share that one service, and a run killed in one test would keep its id
    "in use" for the resumed run of another. Each test starts without it."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m dltrain ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dltrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


# Files whose tests take minutes, run first: `make test` hands whole files to its two workers
# (--dist loadfile, --no-loadscope-reorder: xdist would otherwise put files with many tests first)
# in collection order, and a long file that starts last keeps one worker busy
# while the other idles (the combination matrix's diagonal alone is several minutes).
LONGEST_FIRST = (
    "test_matrix.py",
    "test_bad_input.py",
    "test_bert.py",
    "test_distributed.py",
    "test_nothing_lost.py",
    "test_strategies.py",
    "test_checkpoint.py",
    "test_rundir.py",
    "test_steady_state.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
