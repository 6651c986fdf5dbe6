"""Nothing lost, nothing foreign: the run-directory defects of the second adversarial probe, each
reproduced with real `python -m dltrain` runs of the tiny CNN (resume_helpers.TINY: 20 steps, a
checkpoint every 4), then held by these tests. The rules: nothing a user made is lost or
overwritten without being asked; no run adopts another run's files; a refusal changes nothing;
every bad input is one `dltrain: error:` line and exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from resume_helpers import error_lines, losses, train, trained

EXIT_BAD_INPUT, EXIT_PREEMPTED = 2, 4


def _errors(stderr: str) -> list[str]:
    return [line for line in error_lines(stderr) if line.startswith("dltrain: error:")]


def _tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: a refusal must leave it the same."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _run_id(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A finished tiny run with checkpoints at steps 16 and 20 (keep_last 2)."""
    return trained(tmp_path_factory.mktemp("finished") / "a")


# ----------------------------------------------------------------------------------------------
# 1. A shared checkpoint folder


@pytest.mark.long
def test_a_shared_checkpoint_folder_keeps_runs_apart(data_dir, tmp_path):
    """Run A finishes in a shared folder; run B, in the same folder, is preempted at step 10 and
    resumed with --resume auto: B continues from its own step 8, keeps its id, and A's checkpoints
    are untouched (before: B took A's step_20 and run id and pruned A's checkpoints)."""
    shared = tmp_path / "shared"
    opt = ["--set", f"checkpoint.dir={shared}", "--set", "checkpoint.outside_run_dir=true"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, *opt).returncode == 0
    a_files = _tree(shared)
    first = train(b, *opt, env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "10"})
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-2000:]
    again = train(b, *opt, "--resume", "auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming at step 10 " in again.stdout and f"run-{_run_id(b)}" in again.stdout
    assert _run_id(a) != _run_id(b)
    assert {k: v for k, v in _tree(shared).items() if k.startswith(f"run-{_run_id(a)}")} == a_files
    assert sorted(losses(b)) == list(range(1, 21))  # steps 1-20 once each, not 1-10 then 21-30
    assert json.loads((b / "summary.json").read_text())["run_id"] == _run_id(b)


# ----------------------------------------------------------------------------------------------
# 2, 3. Resumes that refuse before touching anything


@pytest.mark.long
def test_resume_auto_of_a_finished_run_without_checkpoints_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    assert train(run, "--set", "checkpoint.every_steps=null", "--set", "train.max_steps=4").returncode == 0
    before = _tree(run)
    again = train(
        run,
        "--resume",
        "auto",
        "--set",
        "checkpoint.every_steps=null",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.seed=7",
        "--set",
        "train.precision=bf16",
    )
    assert again.returncode == EXIT_BAD_INPUT, again.stderr[-2000:]
    (line,) = _errors(again.stderr)
    assert "holds a finished run and no checkpoint of it to continue from" in line and "--output-dir" in line
    assert _tree(run) == before


@pytest.mark.long
def test_a_refused_resume_changes_nothing(finished, tmp_path):
    """'Past the end' was decided after metrics.jsonl had been cut and preempted.json deleted."""
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    (run / "preempted.json").write_text('{"step": 16}\n')
    before = _tree(run)
    done = train(run, "--resume", str(run / "checkpoints" / "step_20"), "--set", "train.epochs=1")
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    (line,) = _errors(done.stderr)
    assert "past the end of this recipe" in line
    assert _tree(run) == before


# ----------------------------------------------------------------------------------------------
# 4. A full disk while writing the weights


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (CI runs as root): {mounted.stderr.decode()[:200]}"


@pytest.mark.parametrize("what", ["checkpoint", "final_model"])
@pytest.mark.long
def test_a_full_disk_while_writing_weights_is_one_line_and_loses_nothing(data_dir, tmp_path, what):
    """A real 8 MB tmpfs, filled so that the model's weights do not fit. Before: an uncaught
    SafetensorError (exit 1), `.tmp-step_4` left behind; for final_model no summary.json."""
    disk = tmp_path / "disk"
    _tmpfs(disk, "8m")
    try:
        run = disk / "run"
        extra = ["--set", "checkpoint.every_steps=null"] if what == "final_model" else []
        probe = train(tmp_path / "probe", *extra, "--set", "train.max_steps=4")  # how much a run writes
        assert probe.returncode == 0, probe.stderr[-2000:]
        # Room for what the run writes besides weights and checkpoints (its top-level files) and
        # 64 KiB more; the model's weights are 107 KB.
        logs = sum(p.stat().st_size for p in (tmp_path / "probe").iterdir() if p.is_file())
        (disk / "filler").write_bytes(b"\0" * (8 * 2**20 - logs - 64 * 1024))
        done = train(run, *extra, "--set", "train.max_steps=4")
        assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        (line,) = _errors(done.stderr)
        assert "No space left on device" in line and "needs about" in line, line
        assert not list(run.rglob(".tmp-*"))
        if what == "checkpoint":
            assert "checkpoint step_4 not written" in line and "no checkpoint was written yet" in line, line
        else:
            assert "final_model not written" in line, line
            summary = json.loads((run / "summary.json").read_text())
            assert summary["final_model"] is None and summary["steps"] == 4
            assert not (run / "final_model").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------
# 6. A fork is a new run


@pytest.mark.long
def test_a_run_forked_from_another_runs_checkpoint_is_a_new_run(finished, tmp_path):
    fork = tmp_path / "fork"
    done = train(fork, "--resume", str(finished / "checkpoints" / "step_16"))
    assert done.returncode == 0, done.stderr[-2000:]
    identity = json.loads((fork / "run.json").read_text())
    assert identity["run_id"] != _run_id(finished)
    assert identity["forked_from"] == {
        "checkpoint": str(finished / "checkpoints" / "step_16"),
        "run_id": _run_id(finished),
        "step": 16,
    }
    summary = json.loads((fork / "summary.json").read_text())
    assert summary["run_id"] == identity["run_id"] and summary["forked_from"]["run_id"] == _run_id(finished)
    state = json.loads((fork / "checkpoints" / "step_20" / "trainer_state.json").read_text())
    assert state["run_id"] == identity["run_id"]
    # and a run directory that holds one run does not take another run's checkpoint
    other = train(fork, "--resume", str(finished / "checkpoints" / "step_16"))
    assert other.returncode == EXIT_BAD_INPUT
    assert "give a new --output-dir (a fork)" in _errors(other.stderr)[0]


def test_a_fork_takes_no_w_and_b_id_and_a_resume_keeps_its_own(finished, tmp_path):
    """Online, W&B's resume="allow" with the parent's id would write into the parent's W&B run."""
    from dltrain.recipe import load_recipe
    from dltrain.run import start_point
    from resume_helpers import TINY

    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    step = run / "checkpoints" / "step_20"
    state = json.loads((step / "trainer_state.json").read_text()) | {"wandb_run_id": "parent-w-and-b"}
    (step / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((step / "manifest.json").read_text())
    data = (step / "trainer_state.json").read_bytes()
    manifest["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    sets = [TINY[i + 1] for i, arg in enumerate(TINY) if arg == "--set"]
    recipe = load_recipe(TINY[0], "cpu_test", sets)
    assert start_point(run, recipe, "auto")["wandb_run_id"] == "parent-w-and-b"
    (tmp_path / "new").mkdir()
    fork = start_point(tmp_path / "new", recipe, str(step))
    assert fork["wandb_run_id"] is None and fork["forked_from"]["run_id"] == _run_id(run)


# ----------------------------------------------------------------------------------------------
# 16. Changes over several resumes


@pytest.mark.long
def test_resumed_with_changes_keeps_every_segments_changes(data_dir, tmp_path):
    run = tmp_path / "run"
    first = train(run, env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "6"})
    assert first.returncode == EXIT_PREEMPTED
    second = train(run, "--resume", "auto", "--set", "optim.lr=0.002", env={"DLTRAIN_TEST_SIGNAL_AT_STEP": "10"})
    assert second.returncode == EXIT_PREEMPTED, second.stderr[-2000:]
    third = train(run, "--resume", "auto", "--set", "optim.lr=0.002", "--set", "train.log_every=2")
    assert third.returncode == 0, third.stderr[-2000:]
    changes = json.loads((run / "summary.json").read_text())["resumed_with_changes"]
    assert [(c["key"], c["at_step"]) for c in changes] == [("optim.lr", 6), ("train.log_every", 10)], changes


# ----------------------------------------------------------------------------------------------
# 17. Files read back, checked for shape


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", '{"files": {"model.safetensors": 3}}', '{"files": {"../../etc/passwd": {"size": 1, "sha256": "0"}}}'],
)
@pytest.mark.long
def test_a_manifest_of_the_wrong_shape_skips_its_checkpoint(finished, tmp_path, content):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "step_20" / "manifest.json").write_text(content)
    done = train(run, "--resume", "auto", "--set", "train.epochs=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(
        "skipping checkpoint" in n and "step_20" in n and "corrupt manifest.json" in n for n in error_lines(done.stderr)
    ), done.stderr[-2000:]
    assert "resuming at step 16 " in done.stdout


@pytest.mark.parametrize("content", ["[]", '{"state": {"step": "4"}, "recipe": "", "run_id": "x"}'])
def test_a_trainer_state_of_the_wrong_shape_is_refused_in_one_line(finished, tmp_path, content):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    step = run / "checkpoints" / "step_20"
    (step / "trainer_state.json").write_text(content)
    manifest = json.loads((step / "manifest.json").read_text())  # a consistent manifest: only the shape is wrong
    data = (step / "trainer_state.json").read_bytes()
    manifest["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    done = train(tmp_path / "fork", "--resume", str(step))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    (line,) = _errors(done.stderr)
    assert "trainer_state.json is not a trainer state" in line


# ----------------------------------------------------------------------------------------------
# 8. Signals to the launcher reach every worker


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
@pytest.mark.long
def test_a_signal_to_the_launcher_alone_checkpoints_and_stops_every_worker(data_dir, tmp_path, name):
    """torchrun puts its workers in sessions of their own: before, the launcher exited and its
    orphaned workers trained on to the end, holding the lock, writing no checkpoint."""
    import os
    import signal
    import sys
    import time

    import psutil

    from conftest import REPO
    from resume_helpers import TINY

    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dltrain",
            "launch",
            "--cpu",
            "--nproc",
            "2",
            *TINY,
            "--set",
            "train.epochs=20",
            "--output-dir",
            str(run),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DLTRAIN_DATA_DIR": str(data_dir)},
    )
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and launcher.poll() is None
        and not ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 3)
    ):
        time.sleep(0.2)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "dltrain" in " ".join(p.cmdline())]
    assert launcher.poll() is None and workers, "the job did not start"
    os.kill(launcher.pid, getattr(signal, name))  # the launcher's pid alone, not its group
    _, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == EXIT_PREEMPTED, stderr[-3000:]
    note = json.loads((run / "preempted.json").read_text())
    assert note["signal"] == name and Path(note["checkpoint"]).is_dir()
    assert f"stopped by {name} at step {note['step']}" in stderr
    # A preemption, not a failure (issue 20): the workers exit 0 and the launcher alone says 4.
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr and "the job failed" not in stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert note["step"] < 200  # stopped, not trained to the end (20 epochs of 10 steps)
    again = train(
        run, "--resume", "auto", "--set", "train.epochs=20", "--set", "train.max_steps=" + str(note["step"] + 2)
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming at step {note['step']} " in again.stdout


# ----------------------------------------------------------------------------------------------
# 15, 16. The launcher's and the Python API's own inputs


def test_an_ipv6_master_is_read_whole_or_refused_naming_the_brackets():
    from dltrain.launch import LaunchError, parse_master

    assert parse_master("[::1]:29600") == ("::1", 29600)
    assert parse_master("[fe80::1]") == ("fe80::1", 29500)
    assert parse_master("10.0.0.1:1234") == ("10.0.0.1", 1234)
    with pytest.raises(LaunchError, match=r"an IPv6 address goes in brackets, e\.g\. \[::1\]:29500"):
        parse_master("::1")  # was host ':', port 1


def test_launch_refuses_resume_auto_without_output_dir_before_starting_anything():
    from conftest import RECIPES, run_cli

    done = run_cli(
        "launch", str(RECIPES / "cnn_mnist.yaml"), "--profile", "cpu_test", "--cpu", "--nproc", "2", "--resume", "auto"
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert _errors(done.stderr) == [
        "dltrain: error: --resume auto continues the run in --output-dir RUN_DIR: give that directory"
    ]


def test_the_python_api_refuses_resume_auto_without_a_directory_and_takes_one_set_string(tmp_path):
    import dltrain
    from dltrain.api import load
    from dltrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="resume='auto'"):
        dltrain.train("rnn_sine", profile="cpu_test", resume="auto")
    assert load("rnn_sine", "cpu_test", sets="train.max_steps=3").train.max_steps == 3  # was iterated by character


def test_deleting_the_lock_file_does_not_let_a_second_job_in(tmp_path):
    from dltrain.recipe import RecipeError
    from dltrain.rundir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    first = RunLock(run)
    (run / ".lock").unlink()  # a user tidying up under a live run
    with pytest.raises(RecipeError, match="is in use by another run"):
        RunLock(run)
    first.release()
    RunLock(run).release()  # free again once the first job ends


# ----------------------------------------------------------------------------------------------
# 5. Exports never overwrite; 13. eval and export on damaged folders


def _cli(*args: str):
    from conftest import run_cli

    return run_cli(*args)


@pytest.mark.long
def test_export_writes_only_into_a_new_or_empty_folder_and_never_into_a_checkpoint(finished, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    before = _tree(run)
    # into the run directory itself: it would replace the run's first recipe.yaml
    done = _cli("export", str(run), "--output-dir", str(run))
    assert done.returncode == EXIT_BAD_INPUT and "is a run directory" in _errors(done.stderr)[0]
    # into one of its checkpoints: --resume auto would then skip it as damaged
    step = run / "checkpoints" / "step_20"
    for out in (step, step / "export"):
        done = _cli("export", str(run), "--output-dir", str(out))
        assert done.returncode == EXIT_BAD_INPUT and "inside checkpoint" in _errors(done.stderr)[0], done.stderr
    assert _tree(run) == before
    # a folder of the user's: refused, then replaced only when asked, and only if it is an export
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    done = _cli("export", str(run), "--output-dir", str(mine))
    assert done.returncode == EXIT_BAD_INPUT and "is not empty" in _errors(done.stderr)[0]
    assert json.loads((mine / "config.json").read_text()) == {"mine": True}
    assert _cli("export", str(run), "--output-dir", str(mine), "--overwrite").returncode == 0
    assert (mine / "model.safetensors").is_file()
    # a checkpoint's default export lands beside the checkpoints, where keep_last does not prune
    done = _cli("export", str(step))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "export-hf-step_20" / "model.safetensors").is_file() and not (step / "export-hf").exists()
    again = _cli("export", str(step))
    assert again.returncode == EXIT_BAD_INPUT and "--overwrite" in _errors(again.stderr)[0]


@pytest.mark.parametrize(
    "damage",
    [
        "truncated-weights",
        "state-not-json",
        "recipe-not-yaml",
        "recipe-a-list",
        "stray-resume-recipe",
        "bit-flip",
        "output-folder-missing",
    ],
)
def test_eval_and_export_of_a_damaged_folder_is_one_line(finished, tmp_path, damage):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    step = run / "checkpoints" / "step_20"
    target = step if damage in ("state-not-json", "bit-flip") else run
    extra = []
    if damage == "truncated-weights":
        weights = run / "final_model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "state-not-json":
        (step / "trainer_state.json").write_text("{not json")
    elif damage == "recipe-not-yaml":
        (run / "final_model" / "recipe.yaml").write_text("train: [unclosed\n")
        target = run / "final_model"
    elif damage == "recipe-a-list":
        (run / "final_model" / "recipe.yaml").write_text("- 1\n- 2\n")
        target = run / "final_model"
    elif damage == "stray-resume-recipe":
        (run / "recipe.resume-old.yaml").write_text("not: a recipe\n")
    elif damage == "bit-flip":  # eval read a checkpoint without checking its manifest's checksums
        weights = step / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "output-folder-missing":
        extra = ["--output", str(tmp_path / "no" / "such" / "eval.json")]
    commands = [["eval", str(target), *extra]] + (
        [["export", str(target), "--output-dir", str(tmp_path / "out")]] if not extra else []
    )
    for command in commands:
        done = _cli(*command)
        if damage == "stray-resume-recipe":  # not a segment's recipe: ignored, the run's own is read
            assert done.returncode == 0, done.stderr[-2000:]
            continue
        assert done.returncode == EXIT_BAD_INPUT, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        assert len(_errors(done.stderr)) == 1, done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# 14. Bench suites: every mistake found at load time, before the first job


RECORD = "  - name: rnn\n    recipe: recipes/rnn_sine.yaml\n    profile: cpu_test\n"


@pytest.mark.parametrize(
    "suite, message",
    [
        ("records:\n" + RECORD + "    seeds: [0, 1, 1]\n", "seeds repeat [1]"),
        ("records:\n" + RECORD + "    seeds: [-3]\n", "seeds are from 0 to 2**32-1"),
        ("records:\n" + RECORD + "    seeds: [0]\n" + RECORD + "    seeds: [1]\n", "record names must be unique"),
        (
            "records:\n" + RECORD + "    seeds: [0]\n    reference: {what: x, baseline: no_such_script}\n",
            "reference baseline 'no_such_script' is not a baseline script",
        ),
        (
            "records:\n  - name: minilm\n    recipe: recipes/bert_sst2_minilm.yaml\n    profile: cpu_test\n"
            "    overrides: [target.metric=test/accuracy]\n    seeds: [0]\n",
            "has no test split",
        ),
        (
            "entries:\n  - {name: a, recipe: recipes/rnn_sine.yaml, profile: cpu_test, reference: a}\n",
            "names itself as its reference",
        ),
        (
            "gpu_results: /no/such/dir\nentries:\n  - {name: a, recipe: recipes/rnn_sine.yaml, profile: cpu_test}\n",
            "gpu_results /no/such/dir: no summary.json there",
        ),
    ],
)
def test_a_suite_mistake_is_refused_at_load_time_by_a_dry_run(tmp_path, suite, message):
    from conftest import run_cli

    path = tmp_path / "suite.yaml"
    path.write_text(suite)
    done = run_cli("bench", str(path), "--dry-run", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    (line,) = _errors(done.stderr)
    assert message in line, line
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize("size", ["infK", "nanM", "0", "-4K", "2000000G"])
def test_a_comm_size_out_of_range_is_one_line(size):
    from dltrain.bench.comm import parse_size
    from dltrain.recipe import RecipeError

    with pytest.raises(RecipeError, match="give bytes or a number with K, M or G"):
        parse_size(size)
    assert parse_size("4K") == 4096


@pytest.mark.long
def test_launch_with_a_config_file_gets_the_same_pre_flight(tmp_path):
    """--config_file skipped every check: a global batch of 3 over 2 ranks crashed both ranks, and a
    garbage config file was a traceback."""
    from conftest import RECIPES, REPO, run_cli

    cnn = [str(RECIPES / "cnn_mnist.yaml"), "--profile", "cpu_test"]
    odd = run_cli(
        "launch",
        *cnn,
        "--config_file",
        str(REPO / "launch" / "cpu_2proc.yaml"),
        "--set",
        "train.global_batch_size=3",
        "--dry-run",
    )
    assert odd.returncode == EXIT_BAD_INPUT
    (line,) = _errors(odd.stderr)
    assert "train.global_batch_size=3 is not divisible by world size 2" in line, line
    garbage = tmp_path / "garbage.yaml"
    for text in ("- just\n- a list\n", "num_processes: [1, 2]\n", "{{{{\n"):
        garbage.write_text(text)
        done = run_cli("launch", *cnn, "--config_file", str(garbage), "--dry-run")
        assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(_errors(done.stderr)) == 1 and "--config_file" in _errors(done.stderr)[0], done.stderr
