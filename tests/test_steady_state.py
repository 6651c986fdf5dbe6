"""The steady-state training step of each workload's cpu_test recipe, run once per workload in its
own process (tests/steady_driver.py):

* golden loss curves: the first 100 per-step train losses must match tests/golden/ within 1e-5
  relative (a refactor that moves them is not a refactor; regenerate them only in a commit of
  their own that says why: `python tests/steady_driver.py WORKLOAD --write-golden --output-dir DIR`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
from steady_driver import GOLDEN_STEPS, golden_path  # noqa: E402

RTOL = 1e-5


def run_driver(workload: str, out, *extra: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "tests" / "steady_driver.py"), workload, "--output-dir", str(out),
                           *extra], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def steady(request, tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(workload: str) -> dict:
        if workload not in cache:
            cache[workload] = run_driver(workload, tmp_path_factory.mktemp(workload) / "run")
        return cache[workload]

    return get


@pytest.mark.parametrize("workload", ["cnn", "rnn", pytest.param("bert", marks=pytest.mark.slow)])
def test_first_losses_match_the_golden_curve(steady, workload, request):
    if workload == "cnn":
        request.getfixturevalue("data_dir")
    elif workload == "bert":
        request.getfixturevalue("sst2_dir"), request.getfixturevalue("minilm_dir")
    golden = json.loads(golden_path(workload).read_text())["losses"]
    got = steady(workload)["losses"][:GOLDEN_STEPS]
    assert len(golden) == len(got) == GOLDEN_STEPS
    worst = max(range(GOLDEN_STEPS), key=lambda i: abs(got[i] - golden[i]) / abs(golden[i]))
    rel = abs(got[worst] - golden[worst]) / abs(golden[worst])
    assert rel <= RTOL, f"step {worst + 1}: loss {got[worst]!r}, golden {golden[worst]!r} (relative difference {rel:.2e})"
