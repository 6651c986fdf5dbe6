"""benchmarks/device_check.sh, the script a rare, short GPU loan runs: it must not waste its run.

A CPU dry run goes through the real script (DEVICE=cpu, the tiny device_dryrun suite: one dltrain
job inside the harness process and one launched baseline); without CUDA and without DEVICE=cpu
the import check refuses in seconds, before any suite starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "device_check.sh"


def run_script(out, timeout: float, **env) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), **env}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout, env=full, cwd=REPO)
    return proc, time.perf_counter() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_exits_2_at_the_import_check(tmp_path):
    proc, wall = run_script(tmp_path, timeout=120, DEVICE="cuda")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "device_check: CUDA is not available" in out and "DEVICE=cpu" in out
    assert re.search(r"phase import-check +\d+\.\d s \(failed\)", out), out
    assert "running" not in out and not (tmp_path / "bench").exists()  # no suite started: refused before any work


PLAN = re.compile(
    r"device_check: (GPU plan|plan): install (\d+) s, import-check (\d+) s, records (\d+) s \((\S+)\), "
    r"suite (\d+) s \((\S+)\), report (\d+) s: (\d+) s of BUDGET_S=(\d+)"
)


def test_the_gpu_runs_plan_fits_its_budget_and_a_plan_past_it_is_refused(tmp_path):
    """Each phase's planned seconds, the suites' plan_s among them, against BUDGET_S: the GPU run's
    plan must fit (a suite cut by the budget exits 3 with its rows missing), checked without a GPU."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--plan"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k not in ("BUDGET_S", "SUITE", "RECORDS")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (plan,) = PLAN.findall(proc.stdout)
    label, install, imports, records, records_suite, suite, suite_name, report, total, budget = plan
    assert (label, records_suite, suite_name) == ("GPU plan", "ttt_gpu", "gpu_single")
    assert int(total) == sum(map(int, (install, imports, records, suite, report))) <= int(budget)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--plan"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "BUDGET_S": str(int(total) - 1)},
    )
    assert proc.returncode == 2 and "the GPU plan exceeds BUDGET_S" in proc.stdout
    # a run whose plan is past its budget starts nothing
    proc, _ = run_script(tmp_path / "out", timeout=60, DEVICE="cpu", BUDGET_S="100")
    assert proc.returncode == 2 and "the plan exceeds BUDGET_S=100" in proc.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.long
def test_cpu_dry_run_of_the_whole_script(tmp_path, data_dir):
    proc, wall = run_script(tmp_path, timeout=300, DEVICE="cpu", SUITE="device_dryrun", DLTRAIN_DATA_DIR=str(data_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for phase in ("install", "import-check", "suite", "report"):
        assert re.search(rf"device_check: phase {phase} +\d+\.\d s", out), (phase, out)
    assert "device_check: done in" in out
    plans = {p[0]: p for p in PLAN.findall(out)}
    assert set(plans) == {"plan", "GPU plan"}  # its own, and the GPU run's, each phase planned
    assert all(int(p[8]) <= int(p[9]) for p in plans.values())
    bench = tmp_path / "bench"
    assert (bench / "report.md").is_file() and (tmp_path / "device.txt").is_file()
    records = [json.loads(line) for line in (bench / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["status"]) for r in records] == [("dltrain", "ok"), ("bare", "ok")], [
        r["error"] for r in records
    ]
    dl, bare = records
    assert dl["command"].startswith("(in process)") and dl["samples_per_s"] > 0
    assert (bench / "logs" / "cnn-w1-fp32-tput-r0.log").read_text().count("dltrain: done") == 1
    assert bare["samples_per_s"] > 0 and "cnn_bare.py" in bare["command"]  # baselines stay launched processes
    print(f"dry run: {wall:.1f} s")
