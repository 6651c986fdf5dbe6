"""The steady-state training step of each workload's cpu_test recipe, run once per workload in its
own process (tests/steady_driver.py):

* golden loss curves: the first 100 per-step train losses must match tests/golden/ within 1e-5
  relative (a refactor that moves them is not a refactor; regenerate them only in a commit of
  their own that says why: `python tests/steady_driver.py WORKLOAD --write-golden --output-dir DIR`);
  the CNN's curve depends on the CPU's vector ISA (AVX2 and AVX-512 convolutions sum in another
  order), so it has one file per torch CPU capability;
* host reads: over 100 steady steps the loop reads back from the device at most once per sync
  interval (`train.sync_every`, set to 50 here) plus once per log record (and once before each
  evaluation, whose own reads are not the step's): no `.item()`,
  `.tolist()`, `.cpu()`, `__bool__`, ... inside the step;
* the clock: a planted slow log sink (a sleep per record) shows up in samples/s, and the steady
  samples/s agrees with samples trained / (training wall time - evaluation - checkpoints).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
from steady_driver import GOLDEN_STEPS, golden_path  # noqa: E402

RTOL = 1e-5
SYNC_EVERY = 50


def run_driver(workload: str, out, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "steady_driver.py"), workload, "--output-dir", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def steady(request, tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(workload: str) -> dict:
        if workload not in cache:
            cache[workload] = run_driver(
                workload, tmp_path_factory.mktemp(workload) / "run", "--set", f"train.sync_every={SYNC_EVERY}"
            )
        return cache[workload]

    return get


WORKLOADS = ["cnn", "rnn", pytest.param("bert", marks=[pytest.mark.slow, pytest.mark.long])]


def _needs(request, workload: str) -> None:
    if workload == "cnn":
        request.getfixturevalue("data_dir")
    elif workload == "bert":
        request.getfixturevalue("sst2_dir"), request.getfixturevalue("minilm_dir")


@pytest.mark.parametrize("workload", WORKLOADS)
def test_first_losses_match_the_golden_curve(steady, workload, request):
    _needs(request, workload)
    path = golden_path(workload)
    assert path.is_file(), (
        f"no golden curve for this CPU's kernels ({path.name}): record one on a clean tree with "
        f"`python tests/steady_driver.py {workload} --write-golden --output-dir DIR` and commit it"
    )
    golden = json.loads(path.read_text())["losses"]
    got = steady(workload)["losses"][:GOLDEN_STEPS]
    assert len(golden) == len(got) == GOLDEN_STEPS
    worst = max(range(GOLDEN_STEPS), key=lambda i: abs(got[i] - golden[i]) / abs(golden[i]))
    rel = abs(got[worst] - golden[worst]) / abs(golden[worst])
    assert rel <= RTOL, (
        f"step {worst + 1}: loss {got[worst]!r}, golden {golden[worst]!r} (relative difference {rel:.2e})"
    )


@pytest.mark.parametrize("workload", WORKLOADS)
def test_steady_steps_read_from_the_device_only_at_sync_points_and_log_records(steady, workload, request):
    _needs(request, workload)
    run = steady(workload)
    # An evaluation (its own reads are not the step's) is preceded by a sync point of its own.
    allowed = math.ceil(run["counted_steps"] / SYNC_EVERY) + run["records_in_window"] + run["evals_in_window"]
    assert run["records_in_window"] >= 1
    assert run["host_reads"] <= allowed, (
        f"{run['host_reads']} host reads in 100 steps (allowed {allowed}): {run['read_sites']}"
    )


def test_a_slow_step_end_shows_in_samples_per_s_and_the_clocks_agree(tmp_path):
    """Every record sleeps 20 ms in the log sink, one record per step: each step must take at
    least that long on the clock, and the steady rate must match samples / busy wall time."""
    sleep_s = 0.02
    run = run_driver(
        "rnn",
        tmp_path / "run",
        "--steps",
        "160",
        "--count",
        "0",
        "--slow-log-s",
        str(sleep_s),
        "--set",
        "train.log_every=1",
    )
    t = run["throughput"]
    assert t["step_time_ms_p50"] >= 1e3 * sleep_s, t
    assert t["train_samples_per_s"] <= 64 / sleep_s, t  # global batch 64
    assert 0.9 <= t["clock_agreement"] <= 1.1, t
    assert t["eval_s"] > 0 and t["checkpoint_s"] == 0, t
