"""Run-directory integrity (dltrain.rundir, dltrain.resume_rules): one job per directory, resume
with a changed recipe, checkpoints confined to the run, a cut-off metrics.jsonl, a full disk.

Runs are real `python -m dltrain` processes on the tiny CNN of resume_helpers (20 steps, a
checkpoint every 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from resume_helpers import TINY, error_lines, losses, train

EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 4


def _errors(stderr: str) -> list[str]:
    return [line for line in error_lines(stderr) if line.startswith("dltrain: error:")]


def _start_paused(run: Path, log: Path, *extra: str) -> subprocess.Popen:
    """A run that stops half-way through writing its first checkpoint (step 4) and waits there,
    holding its run directory."""
    err = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dltrain", "train", *TINY, "--output-dir", str(run), *extra],
        stdout=subprocess.DEVNULL,
        stderr=err,
        cwd=REPO,
        env={**os.environ, "DLTRAIN_TEST_PAUSE_IN_SAVE": "1"},
    )
    deadline = time.time() + 240
    while "paused while writing" not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert "paused while writing" in log.read_text(), log.read_text()[-2000:]
    return proc


# ----------------------------------------------------------------------------------------------
# One job per run directory


def test_a_second_job_on_a_live_run_directory_is_refused_and_a_killed_one_does_not_block(data_dir, tmp_path):
    run = tmp_path / "run"
    first = _start_paused(run, tmp_path / "first.txt")
    try:
        records_before = (run / "metrics.jsonl").read_text()
        # a requeued job (or the user) resuming while the run is alive, and a plain second run
        # The second job has no data to read (an empty data root and cache, offline): were it refused
        # only after loading its data and model, it would fail on the data instead.
        nothing = tmp_path / "no-data"
        nothing.mkdir()
        no_data = {"DLTRAIN_DATA_DIR": str(nothing), "DLTRAIN_CACHE_DIR": str(nothing), "DLTRAIN_OFFLINE": "1"}
        for extra in (["--resume", "auto"], []):
            second = train(run, *extra, env=no_data)
            assert second.returncode == EXIT_BAD_INPUT, second.stderr[-2000:]
            assert "Traceback" not in second.stderr
            (line,) = _errors(second.stderr)
            assert f"{run} is in use by another run (pid {first.pid} on " in line, line
        assert (run / "metrics.jsonl").read_text() == records_before  # nothing written beside the live run
        assert not (run / "recipe.resume-4.yaml").exists()
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock, the lock file stays
        first.wait()
    assert (run / ".lock").is_file()
    third = train(run, "--resume", "auto")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "starting from scratch" in third.stdout  # step_4 was never finished
    assert sorted(losses(run)) == list(range(1, 21))


def test_two_jobs_started_together_on_one_directory_one_trains(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dltrain", "train", *TINY, "--output-dir", str(run)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_BAD_INPUT], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == EXIT_BAD_INPUT)
    assert "Traceback" not in refused
    (line,) = _errors(refused)
    assert "in use by another run" in line or "already holds a run" in line, line
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == list(range(1, 21))  # one run's records, not two interleaved


# ----------------------------------------------------------------------------------------------
# Resume with a changed recipe


@pytest.fixture()
def stopped_at_8(data_dir, tmp_path) -> Path:
    run = tmp_path / "run"
    done = train(run, env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "8"})
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    return run


def test_resume_applies_allowed_changes_and_records_them(stopped_at_8):
    run = stopped_at_8
    recipe_before = (run / "recipe.yaml").read_text()
    done = train(
        run,
        "--resume",
        "auto",
        "--set",
        "optim.lr=0.0003",
        "--set",
        "optim.weight_decay=0.01",
        "--set",
        "train.epochs=3",
        "--set",
        "checkpoint.every_steps=10",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dltrain: resuming with changes: " in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    changed = {c["key"]: (c["from"], c["to"]) for c in summary["resumed_with_changes"]}
    assert changed == {
        "optim.lr": (0.001, 0.0003),
        "optim.weight_decay": (0.0, 0.01),
        "train.epochs": (2, 3),
        "checkpoint.every_steps": (4, 10),
    }
    assert summary["steps"] == 30  # the third epoch was trained
    # applied, not just recorded: the optimizer the last checkpoint holds runs at the new values
    import torch

    opt = torch.load(run / "checkpoints" / "step_30" / "optimizer.bin", weights_only=True)
    assert [(g["lr"], g["weight_decay"]) for g in opt["param_groups"]] == [(0.0003, 0.01)]
    lrs = {
        r["step"]: r["train/lr"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "train/lr" in r
    }
    assert lrs[8] == 0.001 and lrs[9] == 0.0003
    # each segment's recipe is kept
    assert (run / "recipe.yaml").read_text() == recipe_before
    assert "lr: 0.0003" in (run / "recipe.resume-8.yaml").read_text()


@pytest.mark.parametrize(
    "change, key",
    [("optim.name=sgd", "optim.name"), ("train.seed=7", "train.seed"), ("data.train_subset=1280", "data.train_subset")],
)
def test_resume_refuses_changes_to_the_model_data_or_optimizer_type(stopped_at_8, change, key):
    run = stopped_at_8
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    done = train(run, "--resume", "auto", "--set", change, "--set", "optim.lr=0.01")
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = _errors(done.stderr)
    assert f"different {key} " in line and "optim.lr" not in line, line  # lr alone would be allowed
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # recipe.yaml untouched, no recipe.resume-*.yaml, metrics.jsonl as it was


# ----------------------------------------------------------------------------------------------
# Checkpoints stay inside the run unless asked


@pytest.mark.long
def test_checkpoint_dir_is_confined_and_pruning_spares_other_runs(data_dir, tmp_path):
    run = tmp_path / "runs" / "a"
    for value in ("../../elsewhere", str(tmp_path / "shared_ckpts")):
        done = train(run, "--set", f"checkpoint.dir={value}")
        assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
        (line,) = _errors(done.stderr)
        assert "leads outside the run directory" in line and "checkpoint.outside_run_dir=true" in line, line
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "shared_ckpts").exists()
    assert not (run / "recipe.yaml").exists()
    # opted in: a shared folder that already holds another run's checkpoints (and a stray step_N)
    shared = tmp_path / "shared_ckpts"
    other = run.parent / "b"
    done = train(
        other,
        "--set",
        f"checkpoint.dir={shared}",
        "--set",
        "checkpoint.outside_run_dir=true",
        "--set",
        "train.max_steps=8",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (shared / "step_2").mkdir()
    done = train(
        run,
        "--set",
        f"checkpoint.dir={shared}",
        "--set",
        "checkpoint.outside_run_dir=true",
        "--set",
        "checkpoint.every_steps=6",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Each run writes into its own folder of the shared one, run-<run_id>: ours holds steps 12 and
    # 18 (keep_last=2 pruned step_6), the other run's steps 4 and 8 and the stray folder are untouched.
    ours, theirs = (json.loads((r / "run.json").read_text())["run_id"] for r in (run, other))
    names = {str(p.relative_to(shared)) for p in shared.glob("*/step_*")} | {p.name for p in shared.glob("step_*")}
    assert names == {
        f"run-{ours}/step_12",
        f"run-{ours}/step_18",
        f"run-{theirs}/step_4",
        f"run-{theirs}/step_8",
        "step_2",
    }, names
    assert json.loads((shared / f"run-{ours}" / "step_12" / "manifest.json").read_text())["run_id"] == ours


# ----------------------------------------------------------------------------------------------
# What a crash or a full disk leaves behind


def test_a_cut_off_metrics_line_and_stale_temporaries_do_not_block_resume(stopped_at_8):
    run = stopped_at_8
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "train/loss": 2.2')  # the process died mid-write
    stale = run / "checkpoints" / ".tmp-step_9"
    stale.mkdir()
    done = train(run, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    notes = error_lines(done.stderr)
    assert any("dropped 1 unreadable line" in n for n in notes), notes
    assert any("removed 1 unfinished checkpoint write" in n and ".tmp-step_9" in n for n in notes), notes
    assert not stale.exists()
    assert sorted(losses(run)) == list(range(1, 21))


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("how", ["injected", "tmpfs"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(data_dir, tmp_path, how):
    """`injected`: the 2nd checkpoint write fails with ENOSPC half-way (a test hook). `tmpfs`: a real
    small filesystem that holds one checkpoint and not two, where this machine lets the test mount
    one (root); elsewhere that variant is skipped and the injected one stands."""
    env = {}
    if how == "injected":
        run = tmp_path / "run"
        env = {"DLTRAIN_TEST_ENOSPC_IN_SAVE": "2"}
    else:
        disk = tmp_path / "disk"
        if not _tmpfs(disk, "2m"):
            pytest.skip("cannot mount a tmpfs here (not root)")
        run = disk / "run"
    try:
        if how == "tmpfs":  # leave room for one checkpoint (~0.35 MB) and the logs, not for two
            (disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 600_000))
        done = train(run, "--set", "checkpoint.save_final_model=false", env=env)
        assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        (line,) = _errors(done.stderr)
        assert "checkpoint step_8 not written" in line and "No space left on device" in line, line
        assert f"the last intact checkpoint is {run / 'checkpoints' / 'step_4'}" in line, line
        assert "MB free" in line and "needs about" in line
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4"]  # no .tmp-step_8
        if how == "tmpfs":
            (disk / "filler").unlink()
        again = train(run, "--resume", "auto", "--set", "checkpoint.save_final_model=false")
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resuming at step 4 " in again.stdout
        assert sorted(losses(run)) == list(range(1, 21))
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], capture_output=True)
            shutil.rmtree(disk, ignore_errors=True)
