"""The shipped launch/slurm.sbatch, unchanged, submitted with `sbatch` to a real two-node SLURM cluster.

The cluster is two slurmd daemons (n1, n2) on this host, brought up by `tests/slurm/cluster.sh up`
(`make test-slurm` does it, runs this file with DLTRAIN_SLURM=1 and brings the cluster down). With
DLTRAIN_SLURM=1 a missing cluster is a failure; without it, these tests skip. `make test` leaves
them out (marker `slurm`): a requeued job waits about two minutes before SLURM starts it again.

Each job is one CPU process per node (the nodes have no GPUs, and the script is given none), gloo
between them. A slow step (DLTRAIN_TEST_STEP_SLEEP, on a job's first start only) keeps a job running
until SLURM's timed signal or `scancel` reaches it; it does not change the numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_distributed import LOSS_ATOL, PARAM_ATOL, SMALL, max_param_diff

from conftest import RECIPES, REPO

pytestmark = pytest.mark.slurm

SBATCH = REPO / "launch" / "slurm.sbatch"
DLTRAIN = [sys.executable, "-m", "dltrain"]
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

# The tiny CNN of the resume tests for 300 steps (30 epochs of 10 steps of 64), a loss record per step
# and a checkpoint every 4 steps: the run the preemption and scancel jobs train, interrupted.
LONG = [
    str(RECIPES / "cnn_mnist.yaml"),
    "--profile",
    "cpu_test",
    *[
        a
        for kv in (
            "data.train_subset=640",
            "data.val_fraction=0.01",
            "train.epochs=30",
            "train.log_every=1",
            "checkpoint.every_steps=4",
            "checkpoint.keep_last=2",
            "model.conv1_channels=8",
            "model.conv2_channels=16",
            "model.hidden=32",
            "tracking.plots=false",
        )
        for a in ("--set", kv)
    ],
]
LONG_STEPS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    nodes = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    if done.returncode != 0 or sorted(nodes) != ["n1", "n2"]:
        return f"sinfo sees no nodes n1, n2 ({(done.stderr or done.stdout).strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        message = f"no SLURM test cluster: {problem}; bring it up with `sudo tests/slurm/cluster.sh up`"
        if os.environ.get("DLTRAIN_SLURM") == "1":
            pytest.fail(message + " (DLTRAIN_SLURM=1)")
        pytest.skip(message)


@dataclass
class Job:
    id: str
    log: Path
    run: Path

    def info(self) -> dict[str, str]:
        done = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait(self, timeout: float, states=ENDED) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in states:
                return info
            time.sleep(2)
        raise AssertionError(
            f"job {self.id} not in {sorted(states)} after {timeout:.0f} s: {self.info()}\n{self.text()[-3000:]}"
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def submit(
    where: Path, train_args: list[str], *sbatch_options: str, env: dict | None = None, run: Path | None = None
) -> Job:
    """`sbatch --nodes=2 OPTIONS launch/slurm.sbatch TRAIN_ARGS` from `where`, its log in where/job.out."""
    where.mkdir(parents=True, exist_ok=True)
    run = run or where / "run"
    log = where / "job.out"
    job_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DLTRAIN": " ".join(DLTRAIN),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "MASTER_PORT": str(_free_port()),
        "OUTPUT_DIR": str(run),
        **(env or {}),
    }
    done = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={log}", *sbatch_options, str(SBATCH), *train_args],
        capture_output=True,
        text=True,
        cwd=where,
        env=job_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    job = Job(done.stdout.strip().split(";")[0], log, run)
    print(f"\nslurm: submitted job {job.id}: {' '.join(sbatch_options)} ({where.name})")
    return job


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in records(run) if "train/loss" in r]


def final_model(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final_model" / "model.safetensors"))


def clean(text: str) -> bool:
    """No traceback, no "failed" (as a word: torch's warnings say "Failure to ..."), no srun error."""
    return "Traceback" not in text and not re.search(r"\bfailed\b", text, re.IGNORECASE) and "srun: error" not in text


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory) -> Job:
    """Submitted first, so the other tests' jobs run while SLURM holds this one after its requeue.
    --time=4 with --signal=USR1@120: SIGUSR1 60-120 s into the job (SLURM may send it up to a minute
    early), while the first start's 300 slow steps take 180 s after a start-up of 10-40 s."""
    return submit(
        tmp_path_factory.mktemp("preempt"),
        LONG,
        "--time=4",
        "--signal=USR1@120",
        env={"DLTRAIN_TEST_STEP_SLEEP": "0.6"},
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The LONG run on two local processes (`dltrain launch --cpu --nproc 2`), never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(
        [*DLTRAIN, "launch", "--cpu", "--nproc", "2", *LONG, "--output-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_training(run: Path, reference: Path, what: str) -> None:
    steps = loss_steps(run)
    assert steps == list(range(1, LONG_STEPS + 1)), "each step's record once"
    ours = {r["step"]: r["train/loss"] for r in records(run) if "train/loss" in r}
    theirs = {r["step"]: r["train/loss"] for r in records(reference) if "train/loss" in r}
    loss = max(abs(ours[s] - theirs[s]) for s in theirs)
    param = max_param_diff(final_model(run), final_model(reference))
    print(
        f"slurm: {what}: {len(steps)} step records, max |loss diff| {loss:.3g}, max |param diff| {param:.3g} "
        "vs an uninterrupted 2-process run"
    )
    assert loss <= LOSS_ATOL and param <= PARAM_ATOL


# ----------------------------------------------------------------------------------------------


def test_two_nodes_train_like_one_process_with_the_global_batch(cluster, preempted_job, tmp_path):
    job = submit(tmp_path, SMALL["cnn"])
    one = tmp_path / "one"
    done = subprocess.run(
        [*DLTRAIN, "train", *SMALL["cnn"], "--output-dir", str(one)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = job.wait(900)
    log = job.text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "n[1-2]"
    assert "world 2 x micro-batch 32" in log and "parameters identical on all 2 ranks" in log
    assert "--num_machines 2 --machine_rank 1" in log  # one launcher per node, one CPU process each
    ours = [r["train/loss"] for r in records(job.run) if "train/loss" in r]
    theirs = [r["train/loss"] for r in records(one) if "train/loss" in r]
    assert len(ours) == len(theirs) == 6
    loss = max(abs(a - b) for a, b in zip(ours, theirs))
    param = max_param_diff(final_model(job.run), final_model(one))
    print(
        f"slurm: job {job.id} (2 nodes x 1 process) vs 1 process, global batch 64, 6 steps: "
        f"max |loss diff| {loss:.3g}, max |param diff| {param:.3g}"
    )
    assert loss <= LOSS_ATOL and param <= PARAM_ATOL


def test_a_rank_that_fails_on_one_node_ends_the_whole_job(cluster, preempted_job, tmp_path):
    # Rank 1 (on n2) raises after step 3; unstopped, the job would take 300 s (1 s steps).
    job = submit(
        tmp_path,
        LONG,
        env={"DLTRAIN_TEST_STEP_SLEEP": "1", "DLTRAIN_TEST_FAIL_AT_STEP": "3", "DLTRAIN_TEST_FAIL_RANK": "1"},
    )
    job.wait(900, states={"RUNNING"} | ENDED)
    info = job.wait(150)  # generous, and half of what the job would run
    log = job.text()
    assert info["JobState"] == "FAILED", log[-3000:]
    assert "injected failure on rank 1 at step 3" in log
    print(
        f"slurm: job {job.id}: rank 1 failed at step 3 -> job {info['JobState']} ({info['ExitCode']}) "
        f"after {info.get('RunTime')}"
    )


def test_scancel_writes_a_checkpoint_and_resume_auto_continues_exactly(cluster, preempted_job, uninterrupted, tmp_path):
    job = submit(tmp_path / "first", LONG, env={"DLTRAIN_TEST_STEP_SLEEP": "0.5"}, run=tmp_path / "run")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not ((job.run / "metrics.jsonl").is_file() and len(loss_steps(job.run)) >= 5):
        assert job.info().get("JobState") not in ENDED, job.text()[-3000:]
        time.sleep(1)
    subprocess.run(["scancel", job.id], check=True, timeout=30)
    info = job.wait(120)
    assert info["JobState"] == "CANCELLED"
    note = json.loads((job.run / "preempted.json").read_text())
    assert note["signal"] == "SIGTERM" and Path(note["checkpoint"]).is_dir(), job.text()[-3000:]
    # Submitted again on the same run directory: the script adds --resume auto by itself.
    again = submit(tmp_path / "again", LONG, run=job.run)
    info = again.wait(900)
    assert info["JobState"] == "COMPLETED", again.text()[-3000:]
    assert f"resuming at step {note['step']} " in again.text()
    print(f"slurm: job {job.id} scancelled at step {note['step']} (checkpoint written), job {again.id} resumed")
    _same_training(job.run, uninterrupted, f"jobs {job.id} + {again.id}")


def test_bench_comm_between_the_two_nodes(cluster, preempted_job, tmp_path):
    out = tmp_path / "comm"
    port = _free_port()
    wrap = (
        f"srun --kill-on-bad-exit=1 bash -c '{' '.join(DLTRAIN)} bench comm --nproc 1 --nnodes 2 "
        f"--node-rank $SLURM_NODEID --master n1:{port} --ops all_reduce --max-bytes 16M --output-dir {out}'"
    )
    log = tmp_path / "comm.out"
    done = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--exclusive", f"--output={log}", "--wrap", wrap],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    job = Job(done.stdout.strip().split(";")[0], log, out)
    info = job.wait(900)
    assert info["JobState"] == "COMPLETED", job.text()[-3000:]
    result = json.loads((out / "comm.json").read_text())
    assert result["world_size"] == 2 and result["nnodes"] == 2 and result["backend"] == "gloo"
    fits = [f for f in result["fits"] if f["op"] == "all_reduce"]
    assert fits and all(f["busbw"] > 0 for f in fits)

    def busbw(f) -> str:  # a flat band (latency only) has no bandwidth to show: the report says inf
        return "inf (latency only)" if f["busbw"] >= 1e14 else f"{f['busbw'] / 1e9:.2f} GB/s"

    print(
        f"slurm: job {job.id} bench comm all_reduce, 2 nodes x 1 process, gloo: "
        + ", ".join(f"{f['range']} busbw {busbw(f)} alpha {f['alpha_s'] * 1e6:.0f} us" for f in fits)
    )
    assert "busbw" in (out / "report.md").read_text()


def test_preemption_checkpoints_requeues_resumes_and_finishes_clean(preempted_job, uninterrupted):
    job = preempted_job
    info = job.wait(1200, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = job.text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    preemptions = [int(s) for s in re.findall(r"dltrain: preempted at step (\d+), requeued", log)]
    resumes = [int(s) for s in re.findall(r"resuming at step (\d+) ", log)]
    print(
        f"slurm: job {job.id}: restarts {info['Restarts']}, preempted at steps {preemptions}, "
        f"resumed at steps {resumes}"
    )
    assert preemptions and resumes == preemptions and int(info["Restarts"]) == len(preemptions)
    assert "preempted by SIGUSR1 at step" in log
    assert clean(log), [line for line in log.splitlines() if not clean(line)]
    _same_training(job.run, uninterrupted, f"job {job.id}")
