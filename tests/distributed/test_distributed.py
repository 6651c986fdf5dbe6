"""Proof that one recipe trains the same on 1 process, 2 processes, 2 "nodes" and DeepSpeed ZeRO-1/2/3:
real processes on the CPU, talking over gloo, as `dltrain launch` starts them.

Every run is a few optimizer steps of a `cpu_test` profile with a warm-up schedule and gradient
clipping that bites (clip 0.5 changes the loss from step 3 on), so the schedule, clipping and
accumulation paths of DDP and of DeepSpeed's engine are all compared. The data order is a function of
(seed, epoch, step) only (dltrain.data), so 1 x 2b, 2 x b and 1 x b x 2 accumulation see the same
examples at each optimizer step; what remains is fp32 summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, REPO
from dltrain.launch import accelerate_executable

pytestmark = pytest.mark.distributed

# fp32 per-step mean training loss: measured differences are <= 1e-7 (summation order only); a
# missing all-reduce or a wrong accumulation scale moves the loss by 1e-3 or more.
LOSS_ATOL = 1e-6
# Final parameters after 6 Adam steps: rounding differences are amplified where gradients are
# tiny (Adam divides by their RMS); measured <= 6e-6.
PARAM_ATOL = 1e-4

CNN = str(RECIPES / "cnn_mnist.yaml")
RNN = str(RECIPES / "rnn_sine.yaml")


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


SHORT = _sets(
    "train.max_steps=6",
    "train.log_every=1",
    "schedule.name=linear_warmup",
    "schedule.warmup_steps=2",
    "train.clip_grad_norm=0.5",
)
SMALL = {
    "cnn": [CNN, "--profile", "cpu_test", *SHORT, *_sets("data.train_subset=1024", "data.val_fraction=0.02")],
    "rnn": [RNN, "--profile", "cpu_test", *SHORT, *_sets("data.num_sequences=1000")],
}
ACCUM2 = _sets("train.grad_accum=2")
DLTRAIN = [sys.executable, "-m", "dltrain"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    out: Path

    def losses(self) -> list[float]:
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in records if "train/loss" in r]

    def lrs(self) -> list[float]:
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/lr"] for r in records if "train/lr" in r]

    def final_model(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.out / "final_model" / "model.safetensors"))


class Runs:
    """Each named run starts once per test session and is shared by the tests that compare it."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.cache = root, {}
        self.env = {**os.environ, "DLTRAIN_DATA_DIR": str(data_dir), "WANDB_MODE": "offline"}

    def get(self, name: str, argv: list[str], env: dict | None = None, timeout: float = 300) -> Run:
        if name not in self.cache:
            out = self.root / name
            full_env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}  # None: unset
            done = subprocess.run(
                [*argv, "--output-dir", str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=REPO,
                env=full_env,
            )
            self.cache[name] = Run(done.returncode, done.stdout, done.stderr, out)
        return self.cache[name]

    def ok(self, name: str, argv: list[str], env: dict | None = None) -> Run:
        run = self.get(name, argv, env)
        assert run.returncode == 0, f"{name} failed:\n{run.stderr[-3000:]}"
        return run

    # The runs the tests compare
    def one(self, w: str) -> Run:  # 1 process x global batch
        return self.ok(f"{w}-one", [*DLTRAIN, "train", *SMALL[w]])

    def ddp(self, w: str) -> Run:  # 2 processes x half the batch, started by `dltrain launch`
        return self.ok(f"{w}-ddp", [*DLTRAIN, "launch", "--cpu", "--nproc", "2", *SMALL[w]])

    def accum(self, w: str) -> Run:  # 1 process x half the batch x 2 accumulation steps
        return self.ok(f"{w}-accum", [*DLTRAIN, "train", *SMALL[w], *ACCUM2])


@pytest.fixture(scope="session")
def runs(tmp_path_factory, data_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"), data_dir)


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 6, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------
# Equivalence: world size and accumulation do not change the training


@pytest.mark.parametrize("workload", ["cnn", "rnn"])
@pytest.mark.long
def test_two_processes_train_like_one_process_with_twice_the_batch(runs, workload):
    one, ddp = runs.one(workload), runs.ddp(workload)
    assert "world 2 x micro-batch" in ddp.stdout and "world 1 x micro-batch" in one.stdout
    assert max_diff(ddp.losses(), one.losses()) <= LOSS_ATOL
    assert max_param_diff(ddp.final_model(), one.final_model()) <= PARAM_ATOL
    assert ddp.lrs() == one.lrs()  # the schedule counts optimizer steps, whatever the world size
    # Both ranks hold bit-identical parameters (sha256 of every tensor, compared across ranks).
    assert "parameters identical on all 2 ranks" in ddp.stdout


@pytest.mark.parametrize("workload", ["cnn", "rnn"])
def test_accumulation_trains_like_the_full_batch(runs, workload):
    one, accum = runs.one(workload), runs.accum(workload)
    assert "x accumulation 2 =" in accum.stdout
    assert max_diff(accum.losses(), one.losses()) <= LOSS_ATOL
    assert max_param_diff(accum.final_model(), one.final_model()) <= PARAM_ATOL


NODES = str(REPO / "launch" / "local_multinode.sh")
NODES_ENV = {"DLTRAIN": " ".join(DLTRAIN), "NPROC": "1"}


@pytest.mark.long
def test_two_nodes_on_one_host_train_like_one_node(runs):
    """Two launchers on 127.0.0.1, machine ranks 0 and 1, one process each (launch/local_multinode.sh)."""
    nodes = runs.get("cnn-nodes", [NODES, *SMALL["cnn"]], env=NODES_ENV)
    assert nodes.returncode == 0, nodes.stderr[-3000:]
    assert "node 0 exit 0, node 1 exit 0" in nodes.stderr
    ddp = runs.ddp("cnn")
    assert max_diff(nodes.losses(), ddp.losses()) <= LOSS_ATOL
    assert max_param_diff(nodes.final_model(), ddp.final_model()) <= PARAM_ATOL
    assert "parameters identical on all 2 ranks" in nodes.stdout


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on 2 CPU processes


ZERO3_YAML = [
    accelerate_executable(),
    "launch",
    "--config_file",
    str(REPO / "launch" / "deepspeed_zero3.yaml"),
    "--num_processes",
    "2",
    "-m",
    "dltrain",
    "train",
]


def _zero_run(runs: Runs, stage: int) -> Run:
    if stage == 3:
        # Through the shipped accelerate YAML + DeepSpeed JSON ("auto" batch figures filled by dltrain).
        return runs.ok(
            "cnn-zero3",
            [*ZERO3_YAML, *SMALL["cnn"], *ACCUM2, *_sets("checkpoint.every_steps=3")],
            env={"DS_ACCELERATOR": "cpu"},
        )
    if stage == 2:
        # Over two "nodes" (one launcher each), the stage taken from the recipe by `dltrain launch`.
        return runs.ok("cnn-zero2", [NODES, *SMALL["cnn"], *_sets("deepspeed.zero_stage=2")], env=NODES_ENV)
    # ZeRO-1 with DeepSpeed's own accumulation, against DDP without it.
    return runs.ok(
        "cnn-zero1", [*DLTRAIN, "launch", "--cpu", "--nproc", "2", "--deepspeed", "1", *SMALL["cnn"], *ACCUM2]
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.long
def test_zero_stage_trains_like_ddp_and_exports_a_loadable_model(runs, stage):
    from dltrain.recipe import load_recipe
    from dltrain.workloads import cnn

    run, ddp = _zero_run(runs, stage), runs.ddp("cnn")
    assert "world 2 x micro-batch" in run.stdout
    assert max_diff(run.losses(), ddp.losses()) <= LOSS_ATOL
    weights = run.final_model()  # ZeRO-3: gathered from the shards by accelerator.get_state_dict
    model = cnn.build_model(load_recipe(CNN, "cpu_test"))
    model.load_state_dict(weights, strict=True)
    assert max_param_diff(weights, ddp.final_model()) <= PARAM_ATOL


@pytest.mark.long
def test_zero3_resumes_from_its_sharded_checkpoint_exactly(runs):
    full = _zero_run(runs, 3)
    step3 = full.out / "checkpoints" / "step_3"
    resumed = runs.ok(
        "cnn-zero3-resumed",
        [*ZERO3_YAML, *SMALL["cnn"], *ACCUM2, "--resume", str(step3)],
        env={"DS_ACCELERATOR": "cpu"},
    )
    assert "resuming at step 3" in resumed.stdout
    assert resumed.losses() == full.losses()[3:]  # steps 4-6, bit for bit
    assert max_param_diff(resumed.final_model(), full.final_model()) == 0.0


# ----------------------------------------------------------------------------------------------
# Failures and guards


def test_a_rank_that_raises_stops_the_whole_job_quickly(runs):
    long = _sets("train.max_steps=500")  # without the failure this would run for minutes
    env = {"DLTRAIN_TEST_FAIL_AT_STEP": "3", "DLTRAIN_TEST_FAIL_RANK": "1"}
    run = runs.get(
        "cnn-fail", [*DLTRAIN, "launch", "--cpu", "--nproc", "2", *SMALL["cnn"], *long], env=env, timeout=120
    )
    # A job that hung instead (rank 0 waiting in a collective for rank 1) would outlive the
    # 120 s subprocess timeout, which fails the test; no clock is compared here.
    assert run.returncode != 0
    assert "injected failure on rank 1 at step 3" in run.stderr
    assert "dltrain launch: the job failed" in run.stderr


def _accelerate_two_processes(*train_args: str) -> list[str]:
    """`accelerate launch --multi_gpu` of `dltrain train` on 2 processes, the form the README names."""
    return [
        accelerate_executable(),
        *("launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dltrain", "train", *train_args),
    ]


def test_multi_gpu_launch_on_a_cpu_still_connects_the_processes(runs):
    """`accelerate launch --multi_gpu` without ACCELERATE_USE_CPU starts two processes that each see
    world=1 in a plain Accelerate script; dltrain creates its Accelerator with cpu=True when there is
    no GPU, so they form one world of 2 (and the world guard would stop them otherwise)."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-only behaviour")
    argv = _accelerate_two_processes(*SMALL["rnn"])
    run = runs.get("rnn-raw-multi-gpu", argv, env={"ACCELERATE_USE_CPU": None})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world 2 x micro-batch" in run.stdout and "parameters identical on all 2 ranks" in run.stdout
    assert max_diff(run.losses(), runs.one("rnn").losses()) <= LOSS_ATOL


def test_deepspeed_recipe_under_accelerate_use_cpu_fails_loudly(runs):
    """ACCELERATE_USE_CPU makes Accelerate drop a DeepSpeed plugin silently; dltrain refuses to go on."""
    argv = _accelerate_two_processes(*SMALL["cnn"], *_sets("deepspeed.zero_stage=2"))
    run = runs.get("cnn-ds-dropped", argv, env={"ACCELERATE_USE_CPU": "true"}, timeout=120)
    assert run.returncode != 0
    assert "the recipe asks for DeepSpeed but Accelerate set up MULTI_CPU" in run.stderr
    assert not (run.out / "metrics.jsonl").exists()  # refused before the first step


# ----------------------------------------------------------------------------------------------
# bf16 on the CPU reaches the cpu_test bars


@pytest.mark.slow
@pytest.mark.long
def test_cnn_bf16_on_two_processes_learns_mnist(runs):
    """A third of the cpu_test epoch (300 steps): a CPU without bf16 units (AVX2 only, as CI's
    machine was on 2026-11-28) emulates bf16 at ~3 steps/s here, and the whole epoch ran past 5
    minutes. The bar is the one an fp32 run of the same 300 steps clears (95%)."""
    run = runs.ok(
        "cnn-bf16",
        [
            *DLTRAIN,
            "launch",
            "--cpu",
            "--nproc",
            "2",
            CNN,
            "--profile",
            "cpu_test",
            *_sets("train.precision=bf16", "data.train_subset=19200", "data.val_fraction=0.02"),
        ],
    )
    assert "bf16" in run.stdout and "world 2" in run.stdout
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["steps"] == 300
    assert summary["metrics"]["test/accuracy"] >= 0.95


# The RNN cpu_test bar of tests/integration/test_rnn.py: test MSE under a tenth of the repeat-last-value predictor's.
RNN_CPU_TEST_MSE_RATIO = 0.1


@pytest.mark.slow
def test_rnn_bf16_reaches_the_cpu_test_bar(runs):
    run = runs.ok("rnn-bf16", [*DLTRAIN, "train", RNN, "--profile", "cpu_test", *_sets("train.precision=bf16")])
    assert "bf16" in run.stdout
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["metrics"]["test/mse_ratio"] < RNN_CPU_TEST_MSE_RATIO
