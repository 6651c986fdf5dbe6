"""What the checkpoint and bad-input tests share: a tiny CNN run and ways to compare two runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import RECIPES, REPO, run_cli

# The CNN cpu_test shrunk to seconds: 640 train images (10 steps of 64 per epoch), 2 epochs, a
# small model, a loss record at every step and a checkpoint every 4 steps.
TINY = [
    str(RECIPES / "cnn_mnist.yaml"),
    "--profile",
    "cpu_test",
    "--set",
    "data.train_subset=640",
    "--set",
    "data.val_fraction=0.01",
    "--set",
    "train.epochs=2",
    "--set",
    "train.log_every=1",
    "--set",
    "checkpoint.every_steps=4",
    "--set",
    "checkpoint.keep_last=2",
    "--set",
    "model.conv1_channels=8",
    "--set",
    "model.conv2_channels=16",
    "--set",
    "model.hidden=32",
    "--set",
    "tracking.plots=false",
]
TOTAL_STEPS = 20
PYTHON_BIN = Path(sys.executable).parent


def train(out: Path, *extra: str, env: dict | None = None, timeout: float = 300):
    return run_cli("train", *TINY, "--output-dir", str(out), *extra, env=env, timeout=timeout)


def trained(out: Path) -> Path:
    """`out` after an uninterrupted TINY run (the module fixtures the resume tests compare with)."""
    done = train(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def launch_env(extra: dict | None = None) -> dict:
    """Environment for two CPU processes (README, "Accelerate on a CPU": the working Accelerate/torchrun forms)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", **(extra or {})}


def accelerate_two(out: Path, *extra: str) -> list[str]:
    return [
        str(PYTHON_BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "dltrain",
        "train",
        *TINY,
        "--output-dir",
        str(out),
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def params(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_model" / "model.safetensors"))


def max_differences(a: Path, b: Path) -> tuple[float, float]:
    """(max |loss difference| over all steps, max |parameter difference|) between two runs."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, TOTAL_STEPS + 1)), (sorted(la), sorted(lb))
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    d_loss = max(abs(la[s] - lb[s]) for s in la)
    d_param = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    return d_loss, d_param


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines, progress bars (carriage returns) and library warnings left out."""
    parts = [part for line in stderr.split("\n") for part in line.split("\r")]
    # An error printed while a progress bar is drawn shares its line: keep it from "dltrain:" on.
    lines = [part[part.find("dltrain:") :] if "dltrain:" in part else part.strip() for part in parts]
    noise = ("[WARNING]", "warnings.warn", "%|")
    return [line for line in lines if line and not any(n in line for n in noise)]


__all__ = [
    "REPO",
    "TINY",
    "TOTAL_STEPS",
    "train",
    "trained",
    "losses",
    "params",
    "max_differences",
    "error_lines",
    "launch_env",
    "accelerate_two",
]
