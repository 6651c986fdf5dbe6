"""`dltrain launch` command building and the batch/precision/world guards, without starting processes."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import RECIPES, REPO
from dltrain.accel import check_world, plan_batches
from dltrain.cli import main
from dltrain.launch import LaunchError, build_command
from dltrain.recipe import RecipeError, TrainConfig

CNN = str(RECIPES / "cnn_mnist.yaml")
TRAIN = [CNN, "--profile", "cpu_test"]


def _flags(argv: list[str]) -> dict[str, str]:
    """--name value pairs of an accelerate command line (flags without a value map to '')."""
    out, i = {}, 0
    while i < len(argv) and argv[i] != "-m":
        if argv[i].startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            out[argv[i]] = argv[i + 1] if has_value else ""
            i += 2 if has_value else 1
        else:
            i += 1
    return out


def test_single_process_is_plain_python():
    argv, env = build_command(nproc=1, train_args=TRAIN)
    assert argv == [sys.executable, "-m", "dltrain", "train", *TRAIN] and env == {}
    argv, env = build_command(nproc=1, cpu=True, train_args=TRAIN)
    assert env == {"ACCELERATE_USE_CPU": "true"}


def test_cpu_processes_use_the_multi_gpu_launcher_with_accelerate_use_cpu():
    # `--cpu --num_processes 2` would start one process; `--multi_gpu` alone, unconnected ones.
    argv, env = build_command(nproc=2, cpu=True, train_args=TRAIN)
    flags = _flags(argv)
    assert argv[1] == "launch" and "--multi_gpu" in flags and "--cpu" not in flags
    assert flags["--num_processes"] == "2" and flags["--num_machines"] == "1"
    assert flags["--main_process_port"] == "0"  # a free port: concurrent jobs do not collide
    assert env == {"ACCELERATE_USE_CPU": "true"}
    assert argv[-len(TRAIN) - 3 :] == ["-m", "dltrain", "train", *TRAIN]


def test_nproc_is_per_node_and_num_processes_is_the_total():
    argv, env = build_command(nproc=8, nnodes=4, node_rank=3, master="node001:29600", train_args=TRAIN)
    flags = _flags(argv)
    assert flags["--num_processes"] == "32" and flags["--num_machines"] == "4"
    assert flags["--machine_rank"] == "3"
    assert flags["--main_process_ip"] == "node001" and flags["--main_process_port"] == "29600"
    assert env == {}


def test_deepspeed_on_cpu_never_sets_accelerate_use_cpu():
    argv, env = build_command(nproc=2, cpu=True, deepspeed=3, train_args=TRAIN)
    flags = _flags(argv)
    assert "--use_deepspeed" in flags and flags["--zero_stage"] == "3" and "--multi_gpu" not in flags
    assert env == {"DS_ACCELERATOR": "cpu"}  # ACCELERATE_USE_CPU would drop the DeepSpeed plugin


def test_deepspeed_on_several_nodes_uses_one_launcher_per_node():
    argv, _ = build_command(nproc=8, nnodes=2, node_rank=1, master="10.0.0.1:29500", deepspeed=2, train_args=TRAIN)
    assert _flags(argv)["--deepspeed_multinode_launcher"] == "standard"  # torchrun per node, not pdsh/ssh


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nproc=0), "at least 1"),
        (dict(nproc=2, nnodes=2), "--master"),
        (dict(nproc=2, nnodes=2, node_rank=2, master="h:1"), "--node-rank 2"),
        (dict(nproc=2, deepspeed=4), "ZeRO stage"),
        (dict(nproc=2, nnodes=2, master="h:port"), "ADDR:PORT"),
        (dict(nproc=2, nnodes=2, master=":29500"), "host name"),  # was taken as the address "29500"
        (dict(nproc=2, nnodes=2, master="h:99999"), "1 to 65535"),
        (dict(nproc=2, nnodes=2, master="h:\u00b2"), "1 to 65535"),  # '²'.isdigit(): was a ValueError from int()
        (dict(nproc=2, nnodes=2, master="h:0"), "port 0"),  # a free port node 1 cannot know
        (dict(nproc=2, nnodes=2, master="a host:29500"), "host name"),
        (dict(nproc=8, nnodes=2**30, master="h:1"), "2\\*\\*31"),  # ranks are 32-bit integers in torch.distributed
    ],
)
def test_impossible_launch_options_are_refused(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        build_command(train_args=TRAIN, **kwargs)


def test_master_without_a_port_takes_the_default_and_one_node_may_take_any_free_port():
    argv, _ = build_command(nproc=1, nnodes=2, master="node001", train_args=TRAIN)
    assert _flags(argv)["--main_process_port"] == "29500"
    argv, _ = build_command(nproc=2, master="127.0.0.1:0", train_args=TRAIN)
    assert _flags(argv)["--main_process_port"] == "0"


def test_launch_refuses_process_counts_this_host_cannot_run_before_starting_any(capsys, monkeypatch):
    import os

    from dltrain import launch, supervise

    def must_not_run(argv, env):
        raise AssertionError(f"launched {argv}")

    monkeypatch.setattr(supervise, "run_command", must_not_run)
    too_many = 4 * (os.cpu_count() or 1) + 1
    rc, _, err = _launch(capsys, "--cpu", "--nproc", str(too_many), *TRAIN)
    assert rc == 2 and f"--nproc {too_many}: more than 4 processes per core" in err
    rc, _, err = _launch(capsys, "--cpu", "--nproc", "0", *TRAIN)  # was silently one process (`nproc or 1`)
    assert rc == 2 and "--nproc 0" in err
    rc, _, err = _launch(capsys, "--dry-run", "--nproc", "0", *TRAIN)
    assert rc == 2 and "--nproc 0" in err
    import torch

    if not torch.cuda.is_available():  # one process per GPU: none here
        with pytest.raises(LaunchError, match="0 visible GPU"):
            launch.check_nproc(1, cpu=False)


def _launch(capsys, *args: str) -> tuple[int, str, str]:
    """`dltrain launch ARGS` in this process (a --dry-run starts nothing; saves an interpreter start)."""
    rc = main(["launch", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_prints_the_command_and_checks_the_recipe_first(capsys):
    rc, out, err = _launch(capsys, "--dry-run", "--cpu", "--nproc", "2", *TRAIN, "--set", "train.epochs=2")
    assert rc == 0, err
    line = out.strip()
    assert line.startswith("ACCELERATE_USE_CPU=true ") and "--num_processes 2" in line
    assert line.endswith("-m dltrain train " + " ".join(TRAIN) + " --set train.epochs=2")
    rc, out, err = _launch(capsys, "--dry-run", "--nproc", "2", *TRAIN, "--set", "train.epocs=2")
    assert rc == 2 and "unknown key 'train.epocs'" in err and out == ""
    rc, _, err = _launch(capsys, "--dry-run", "--nnodes", "2", *TRAIN)
    assert rc == 2 and "several nodes need --master" in err


def test_the_recipe_is_checked_with_the_launchers_deepspeed_stage(capsys):
    # ZeRO-3 parameter offload: valid with --deepspeed 3, dropped without a word below it (refused)
    rc, out, err = _launch(
        capsys,
        "--dry-run",
        "--cpu",
        "--nproc",
        "2",
        "--deepspeed",
        "3",
        *TRAIN,
        "--set",
        "deepspeed.offload_params=cpu",
    )
    assert rc == 0 and "--zero_stage 3" in out, err
    rc, out, err = _launch(
        capsys, "--dry-run", "--cpu", "--nproc", "2", *TRAIN, "--set", "deepspeed.offload_params=cpu"
    )
    assert rc == 2 and "deepspeed.offload_params needs deepspeed.zero_stage 3" in err


def test_the_recipes_deepspeed_stage_selects_the_deepspeed_launcher(capsys):
    rc, out, err = _launch(capsys, "--dry-run", "--cpu", "--nproc", "2", *TRAIN, "--set", "deepspeed.zero_stage=2")
    assert rc == 0, err
    assert out.startswith("DS_ACCELERATOR=cpu ") and "--use_deepspeed --zero_stage 2" in out


# ----------------------------------------------------------------------------------------------
# Batch arithmetic and guards


@pytest.mark.parametrize(
    "given, world, expect",
    [
        (dict(global_batch_size=64), 1, (64, 1)),
        (dict(global_batch_size=64), 2, (32, 1)),
        (dict(global_batch_size=64), 8, (8, 1)),
        (dict(global_batch_size=64, grad_accum=2), 2, (16, 2)),
        (dict(global_batch_size=64, micro_batch_size=8), 2, (8, 4)),
        (dict(global_batch_size=64, micro_batch_size=16, grad_accum=2), 2, (16, 2)),
    ],
)
def test_micro_batch_and_accumulation_are_derived_from_the_world(given, world, expect):
    plan = plan_batches(TrainConfig(**given), world)
    assert (plan.micro_batch, plan.grad_accum) == expect
    assert plan.micro_batch * plan.grad_accum * world == plan.global_batch == given["global_batch_size"]


@pytest.mark.parametrize(
    "given, world, message",
    [
        (dict(global_batch_size=64), 3, "not divisible by world size 3"),
        (dict(global_batch_size=64, micro_batch_size=24), 2, "not a multiple"),
        (dict(global_batch_size=64, micro_batch_size=16, grad_accum=4), 2, "= 128, not train.global_batch_size=64"),
    ],
)
def test_batch_figures_that_do_not_multiply_out_are_refused(given, world, message):
    with pytest.raises(RecipeError, match=message):
        plan_batches(TrainConfig(**given), world)


def test_world_guard_refuses_processes_that_each_see_a_world_of_one():
    with pytest.raises(RecipeError, match="launched 2 processes but this one sees a world of 1"):
        check_world(SimpleNamespace(num_processes=1), launched=2)
    check_world(SimpleNamespace(num_processes=2), launched=2)


# ----------------------------------------------------------------------------------------------
# The SLURM script, with stand-ins for srun and scontrol


def _readme_slurm_example() -> list[str]:
    (line,) = [
        s for s in (REPO / "README.md").read_text().splitlines() if s.strip().startswith("sbatch launch/slurm.sbatch")
    ]
    return line.split("#")[0].split()[2:]  # the arguments after the script


# Stand-ins for srun (the step once per node, as SLURM runs it, each with its SLURM_NODEID; the
# four nodes at once, each node's output collected in rank order) and scontrol.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" > "node$i.out" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
for ((i = 0; i < SLURM_NNODES; i++)); do cat "node$i.out"; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node007\\ngpu-node008\\ngpu-node009\\ngpu-node010\\n'
"""


@pytest.mark.slow  # four interpreter starts at once: 6-12 s depending on load
@pytest.mark.long
def test_the_readme_slurm_example_launches_at_4_nodes_x_8_gpus(tmp_path):
    # The line the README gives, one launcher per node with its rank, the rendezvous on the first
    # host (the old line, batch 16 over 32 GPUs, is refused in one line before any process starts:
    # tests/integration/test_package.py).
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node[007-010]",
        "SLURM_NNODES": "4",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "dltrain",
        "SLURM_GPUS_ON_NODE": "8",
        "MASTER_PORT": "29611",
        "DLTRAIN": f"{sys.executable} -m dltrain",
    }
    example = _readme_slurm_example()
    assert example[0] == "bert_sst2"  # by name: the script resolves it from any directory
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), *example, "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4
    for rank, line in enumerate(lines):
        assert (
            f"--num_processes 32 --num_machines 4 --machine_rank {rank} --main_process_ip gpu-node007 "
            "--main_process_port 29611"
        ) in line
        assert line.endswith(" ".join(example) + " --output-dir runs/dltrain-77")


# ----------------------------------------------------------------------------------------------
# Launchers that cannot run the wrong world (issue 20), and CPU threads per process


def _accelerate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` as a user types it (the accelerate beside this interpreter)."""
    from dltrain.launch import accelerate_executable

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [accelerate_executable(), "launch", *args], capture_output=True, text=True, timeout=600, env=full_env, cwd=REPO
    )


def _dltrain_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dltrain: error:")]


def test_accelerates_cpu_launcher_asked_for_two_processes_is_refused_naming_the_command_that_starts_two(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: it trained a world of 1 without a word."""
    done = _accelerate(
        "--cpu",
        "--num_processes",
        "2",
        "-m",
        "dltrain",
        "train",
        *TRAIN,
        "--set",
        "train.max_steps=1",
        "--output-dir",
        str(tmp_path / "run"),
    )
    # dltrain exits 2; Accelerate's launcher then exits 1 with its own traceback of the child's failure.
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = _dltrain_errors(done.stderr)
    assert "asked for 2 CPU processes but started one" in line, line
    assert f"`dltrain launch --cpu --nproc 2 {' '.join(TRAIN)} --set train.max_steps=1 --output-dir" in line, line
    assert "world 1" not in done.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_root_gpu_config_on_a_host_without_gpus_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """The root accelerate_config.yaml (gpu_ids: all, 8 processes) started 8 CPU processes on 2 cores."""
    import torch

    from dltrain import supervise

    if torch.cuda.is_available():
        pytest.skip("the refusal is for hosts without a GPU; here the config runs one process per GPU")
    root = str(REPO / "accelerate_config.yaml")
    monkeypatch.setattr(supervise, "run_command", lambda argv, env: pytest.fail(f"launched {argv}"))
    rc, _, err = _launch(capsys, *TRAIN, "--config_file", root)
    assert rc == 2 and len(_dltrain_errors(err)) == 1, err
    assert "is a GPU config (gpu_ids: all, 8 processes)" in err and "launch/cpu_2proc.yaml" in err, err
    rc, _, err = _launch(capsys, *TRAIN, "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"), "--dry-run")
    assert rc == 0, err  # the CPU config it names is not refused
    # Plain accelerate launch with it (two processes here, to start fewer): each rank refuses, rank 0 says so.
    done = _accelerate(
        "--config_file",
        root,
        "--num_processes",
        "2",
        "-m",
        "dltrain",
        "train",
        *TRAIN,
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert done.returncode != 0 and "dltrain: cnn_mnist" not in done.stdout, done.stdout[-2000:]
    (line,) = _dltrain_errors(done.stderr)
    assert "is a GPU config (gpu_ids: all, 8 processes)" in line and "launch/cpu_2proc.yaml" in line, line


def test_cpu_threads_are_the_recipes_else_omp_num_threads_else_cores_over_local_processes(monkeypatch):
    from dltrain.launched import THREADS_AUTO, cores, cpu_threads, launcher_thread_env

    n = len(os.sched_getaffinity(0))
    assert cores() == n
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None, {}) == (n, f"{n} cores / 1 process on this node")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * n))  # more processes than cores: still one thread each
    assert cpu_threads(None, {})[0] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(None, {}) == (max(1, n // 2), f"{n} cores / 2 processes on this node")
    assert cpu_threads(None, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert cpu_threads(5, {"OMP_NUM_THREADS": "3"}) == (5, "train.cpu_threads")
    # dltrain launch's own OMP_NUM_THREADS is a default, not the user's: cores / local processes again
    assert cpu_threads(None, {"OMP_NUM_THREADS": "1", THREADS_AUTO: "1"})[1] == f"{n} cores / 2 processes on this node"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launcher_thread_env(None, 2) == {"OMP_NUM_THREADS": str(max(1, n // 2)), THREADS_AUTO: "1"}
    assert launcher_thread_env(7, 2)["OMP_NUM_THREADS"] == "7"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launcher_thread_env(None, 2) == {}  # the user's value reaches the processes as it is


@pytest.mark.long
def test_dltrain_train_on_a_cpu_prints_its_threads_and_takes_cores_over_processes(tmp_path):
    """It used every core's thread per process, with nothing printed."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    n = len(os.sched_getaffinity(0))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dltrain",
            "train",
            *TRAIN,
            "--set",
            "train.max_steps=1",
            "--output-dir",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    threads = f"{n} CPU thread{'s' if n > 1 else ''} per process ({n} cores / 1 process on this node)"
    assert f"device cpu, {threads}" in done.stdout, done.stdout[:1000]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dltrain",
            "train",
            *TRAIN,
            "--set",
            "train.max_steps=1",
            "--set",
            "train.cpu_threads=3",
            "--output-dir",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device cpu, 3 CPU threads per process (train.cpu_threads)" in done.stdout, done.stdout[:1000]
