"""Checkpoints and resume: exactness against an uninterrupted run (1 and 2 processes), SIGTERM,
SIGKILL while writing, elastic restart after a crash, non-finite loss, and what is kept safe.

Runs are real `python -m dltrain` processes on the tiny CNN of resume_helpers (20 steps, a
checkpoint every 4). Test hooks (environment variables read by dltrain.checkpoint) stop, crash or
pause a run at a chosen step; the signals and the crash themselves are real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from resume_helpers import accelerate_two, error_lines, launch_env, max_differences, train, trained

EXIT_PREEMPTED = 4


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted single-process run every resumed run must reproduce bit for bit."""
    return trained(tmp_path_factory.mktemp("ref") / "run")


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------------------------
# Unit checks of the on-disk format (no training)


def test_scan_tells_complete_from_incomplete(tmp_path):
    from dltrain.checkpoint_scan import MANIFEST, problem_with, scan
    from dltrain.data import sha256_of as _sha256

    root = tmp_path / "checkpoints"
    good = root / "step_8"
    good.mkdir(parents=True)
    (good / "a.bin").write_bytes(b"12345")
    (good / "trainer_state.json").write_text(json.dumps({"state": {"step": 8}, "recipe": "", "run_id": "r"}))
    files = {
        name: {"size": (good / name).stat().st_size, "sha256": _sha256(good / name)}
        for name in ("a.bin", "trainer_state.json")
    }
    (good / MANIFEST).write_text(json.dumps({"files": files}))
    (root / "step_12").mkdir()  # renamed without a manifest cannot happen, but a copy by hand can
    (root / ".tmp-step_16").mkdir()
    complete, bad = scan(root)
    assert complete == [good]
    assert sorted(p.name for p, _ in bad) == [".tmp-step_16", "step_12"]
    (good / "a.bin").write_bytes(b"12346")
    assert "checksum" in problem_with(good)


# ----------------------------------------------------------------------------------------------
# One process


def _kill_while_writing(run: Path, log: Path, env: dict) -> None:
    """Start a run whose 2nd checkpoint write (step 8) pauses half-written, and SIGKILL it there."""
    from resume_helpers import TINY

    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dltrain", "train", *TINY, "--set", "tracking.wandb=true", "--output-dir", str(run)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **env, "DLTRAIN_TEST_PAUSE_IN_SAVE": "2"},
            cwd=REPO,
        )
        deadline = time.time() + 240
        while "paused while writing" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert "paused while writing" in log.read_text(), log.read_text()[-2000:]
        proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        proc.wait()


@pytest.mark.slow
@pytest.mark.long
def test_killed_while_writing_then_sigterm_mid_epoch_then_resume_is_bit_identical(reference, tmp_path):
    """Three legs of one run: SIGKILL while writing step_8; resume from step_4 and SIGTERM at step 13
    (mid-epoch 2); resume from step_13. Losses and final weights equal the uninterrupted run's."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    secret = {"WANDB_API_KEY": "secret-xyz"}  # with WANDB_MODE=offline (conftest)
    _kill_while_writing(run, tmp_path / "leg1.txt", secret)
    assert (ckpts / "step_4" / "manifest.json").is_file()
    assert (ckpts / ".tmp-step_8").is_dir() and not (ckpts / ".tmp-step_8" / "manifest.json").exists()
    assert not (ckpts / "step_8").exists()
    wandb_id = _state(ckpts / "step_4")["wandb_run_id"]

    second = train(
        run, "--resume", "auto", "--set", "tracking.wandb=true", env={**secret, "DLTRAIN_TEST_SIGNAL_AT_STEP": "13"}
    )
    assert second.returncode == EXIT_PREEMPTED, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    lines = error_lines(second.stderr)
    warnings = [line for line in lines if "warning: skipping checkpoint" in line]
    assert len(warnings) == 1 and ".tmp-step_8" in warnings[0]
    assert "resuming at step 4 " in second.stdout
    assert any(line.startswith("dltrain: preempted: stopped by SIGTERM at step 13") for line in lines)
    assert json.loads((run / "preempted.json").read_text())["step"] == 13
    # keep_last=2: step_4 and the new step_8 went once step_12 and step_13 were complete; the
    # half-written .tmp-step_8 went with them
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_12", "step_13"]
    saved = _state(ckpts / "step_13")
    assert (saved["state"]["epoch"], saved["state"]["step_in_epoch"]) == (1, 3)

    third = train(run, "--resume", "auto", "--set", "tracking.wandb=true", env=secret)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resuming at step 13 (epoch 1, step 3 in it)" in third.stdout
    assert max_differences(reference, run) == (0.0, 0.0)
    summary = json.loads((run / "summary.json").read_text())
    assert wandb_id and summary["wandb_run_id"] == saved["wandb_run_id"] == wandb_id  # one W&B run throughout
    assert not (run / "preempted.json").exists()
    # The W&B API key is never written: not in logs, configs, checkpoints or W&B's own files.
    for path in run.rglob("*"):
        if path.is_file():
            assert b"secret-xyz" not in path.read_bytes(), path
    assert (
        "secret-xyz"
        not in (tmp_path / "leg1.txt").read_text() + second.stdout + second.stderr + third.stdout + third.stderr
    )


RNN_TINY = [
    "--profile",
    "cpu_test",
    "--set",
    "data.num_sequences=1000",
    "--set",
    "train.epochs=2",
    "--set",
    "train.log_every=1",
    "--set",
    "checkpoint.every_steps=4",
    "--set",
    "tracking.plots=false",
]


@pytest.mark.slow
@pytest.mark.long
def test_rnn_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    from conftest import RECIPES, run_cli
    from dltrain.workload import workload_names

    if "rnn" not in workload_names():
        pytest.skip("the RNN workload is not in this tree")
    rnn = [str(RECIPES / "rnn_sine.yaml"), *RNN_TINY]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_cli("train", *rnn, "--output-dir", str(ref)).returncode == 0
    first = run_cli("train", *rnn, "--output-dir", str(run), env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "13"})
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-2000:]
    second = run_cli("train", *rnn, "--output-dir", str(run), "--resume", "auto")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming at step 13 (epoch 1, step 3 in it)" in second.stdout
    from resume_helpers import losses, params

    assert losses(ref) == losses(run) and len(losses(ref)) == 20
    pa, pb = params(ref), params(run)
    assert all((pa[k] == pb[k]).all() for k in pa)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    done = train(run, "--set", "optim.lr=1e30", "--set", "checkpoint.every_steps=1")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    [line] = [line for line in error_lines(done.stderr) if line.startswith("dltrain: training stopped")]
    match = re.search(r"non-finite loss at step (\d+) .*last good checkpoint: (\S+)\.", line)
    assert match, line
    step, ckpt = int(match[1]), Path(match[2])
    assert ckpt == run / "checkpoints" / f"step_{step - 1}" and (ckpt / "manifest.json").is_file()
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/nonfinite_steps" in r] == [step]


def test_no_unsafe_loading_in_the_code():
    """Checkpoints load with weights_only=True or safetensors, YAML with safe_load, no eval/exec."""
    for path in (REPO / "dltrain").rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call[1], f"{path}: {call[0]}"
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
        assert not re.search(r"pickle\.loads?\(", text), path


# ----------------------------------------------------------------------------------------------
# Two processes


@pytest.fixture(scope="module")
def reference_two(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref2") / "run"
    done = subprocess.run(accelerate_two(out), capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_two_processes_signal_on_one_rank_then_resume_is_bit_identical(reference_two, tmp_path):
    run = tmp_path / "run"
    # SIGUSR1 reaches rank 1 only after step 5: both ranks must still stop after the same step,
    # agreed at their next sync point (no collective per step): with train.sync_every=3 that is
    # step 6, before the checkpoint every 4 steps would have been one.
    env = launch_env({"DLTRAIN_TEST_SIGNAL_AT_STEP": "5:1", "DLTRAIN_TEST_SIGNAL": "SIGUSR1"})
    first = subprocess.run(
        accelerate_two(run, "--set", "train.sync_every=3"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert first.returncode != 0  # the launcher reports a worker's exit code 4 as a failure
    assert json.loads((run / "preempted.json").read_text())["step"] == 6
    saved = _state(run / "checkpoints" / "step_6")
    assert saved["world_size"] == 2 and saved["state"]["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints" / "step_6").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    second = subprocess.run(
        accelerate_two(run, "--resume", "auto"), capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert max_differences(reference_two, run) == (0.0, 0.0)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.long
def test_elastic_restart_after_a_crash_resumes_from_the_last_checkpoint(reference_two, tmp_path):
    run = tmp_path / "run"
    env = launch_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "DLTRAIN_TEST_CRASH_AT_STEP": "10:1"})
    torchrun = Path(sys.executable).with_name("torchrun")
    from resume_helpers import TINY

    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "dltrain",
        "train",
        *TINY,
        "--output-dir",
        str(run),
        "--resume",
        "auto",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "planted crash at step 10 on rank 1" in done.stderr
    assert "starting from scratch" in done.stdout and "resuming at step 8 " in done.stdout
    assert max_differences(reference_two, run) == (0.0, 0.0)


@pytest.mark.slow
def test_resume_with_another_world_size_is_supported(reference_two, tmp_path):
    """A 2-process checkpoint continues in 1 process: same global batch, same data order."""
    src = reference_two / "checkpoints" / "step_16"  # keep_last=2 left step_16 and step_20
    ckpt = tmp_path / "step_16"
    shutil.copytree(src, ckpt)
    done = train(tmp_path / "run", "--resume", str(ckpt))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "checkpoint written by 2 processes, resuming with 1" in done.stderr
    assert "resuming at step 16 " in done.stdout


@pytest.mark.slow
@pytest.mark.long
def test_a_compiled_run_exports_weights_that_load_into_the_plain_model(data_dir, tmp_path):
    """torch.compile wraps the forward function, not the module: no `_orig_mod.` keys anywhere."""
    import torch
    from safetensors.torch import load_file

    from dltrain.recipe import load_recipe
    from dltrain.workloads import cnn
    from resume_helpers import TINY

    run = tmp_path / "run"
    done = train(run, "--set", "train.compile=true", "--set", "train.max_steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
    weights = load_file(str(run / "final_model" / "model.safetensors"))
    overrides = [s for flag, s in zip(TINY, TINY[1:]) if flag == "--set" and s.startswith("model.")]
    net = cnn.Net(load_recipe(TINY[0], "cpu_test", overrides).model)
    net.load_state_dict(weights, strict=True)
    ckpt = load_file(str(run / "checkpoints" / "step_4" / "model.safetensors"))
    assert ckpt.keys() == net.state_dict().keys()
    assert torch.isfinite(torch.stack([w.abs().sum() for w in weights.values()])).all()
