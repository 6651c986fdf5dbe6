"""MNIST CNN, five pipelines side by side in one run, interleaved so machine noise hits all alike:

  bare          benchmarks/baselines/cnn_bare.py: a minimal hand-written PyTorch loop, run with
                the host allocator settings dltrain applies to itself (dltrain/allocator.py)
  dltrain       `dltrain train recipes/cnn_mnist.yaml` with the in-memory tensor loader (default)
  dltrain-torch the same with `data.loader=torch`: torchvision MNIST -> PIL -> ToTensor ->
                Normalize through a DataLoader, the original notebook's pipeline
  bare-malloc-default, dltrain-malloc-default
                bare and dltrain with glibc's allocator left as it is (DLTRAIN_MALLOC_TUNING=0)

Same model, batch, optimizer and precision; each figure is steady-state train samples/s (warm-up
excluded, evaluation excluded). Reports per-repeat values, medians, and the ratios dltrain / bare
(the loop's overhead, same allocator), tuned / default allocator, and the epoch-time ratio
torch-loader / tensor-loader.

    python benchmarks/cnn_pipeline.py --steps 300 --repeats 3 --out benchmarks/results/cnn_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from dltrain import allocator

REPO = Path(__file__).resolve().parents[1]
EPOCH_EXAMPLES = 54_000  # train split of MNIST with the default val_fraction 0.1


def _env(**extra: str) -> dict[str, str]:
    """This environment without any MALLOC_*_ setting of the user's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    return env | extra


UNTUNED = {"DLTRAIN_MALLOC_TUNING": "0"}


def run_bare(args, tuned: bool = True) -> float:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks/baselines/cnn_bare.py"),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--precision",
        args.precision,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env=_env(**(allocator.ENV if tuned else UNTUNED))
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["train_samples_per_s"]


def run_dltrain(args, loader: str, workdir: Path, tag: str, tuned: bool = True) -> float:
    out = workdir / tag
    cmd = [
        sys.executable,
        "-m",
        "dltrain",
        "train",
        str(REPO / "recipes/cnn_mnist.yaml"),
        "--output-dir",
        str(out),
        "--set",
        f"train.max_steps={args.steps + 5}",
        "--set",
        "train.warmup_steps_excluded=5",
        "--set",
        f"train.global_batch_size={args.batch}",
        "--set",
        f"train.precision={args.precision}",
        "--set",
        f"data.loader={loader}",
        "--set",
        "train.log_every=100",
        "--set",
        "tracking.wandb=false",
        "--set",
        "tracking.plots=false",
        "--set",
        "checkpoint.save_final_model=false",
    ]
    # Tuned, dltrain sets the allocator itself: no MALLOC_* variables, so it is its own doing.
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env(**({} if tuned else UNTUNED)))
    return json.loads((out / "summary.json").read_text())["throughput"]["train_samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cnn_pipeline")
    args = ap.parse_args()

    pipelines = {
        "bare": lambda tmp, rep: run_bare(args),
        "dltrain": lambda tmp, rep: run_dltrain(args, "tensor", tmp, f"tensor{rep}"),
        "dltrain-torch": lambda tmp, rep: run_dltrain(args, "torch", tmp, f"torch{rep}"),
        "bare-malloc-default": lambda tmp, rep: run_bare(args, tuned=False),
        "dltrain-malloc-default": lambda tmp, rep: run_dltrain(args, "tensor", tmp, f"default{rep}", tuned=False),
    }
    results: dict[str, list[float]] = {k: [] for k in pipelines}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, run in pipelines.items():
                results[name].append(run(Path(tmp), rep))
            print(
                f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()),
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in results.items()}
    pair = [d / b for d, b in zip(results["dltrain"], results["bare"])]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": vars(args) | {"out": str(args.out)},
        "samples_per_s": results,
        "median_samples_per_s": med,
        "dltrain_over_bare": med["dltrain"] / med["bare"],
        "dltrain_over_bare_per_repeat": pair,
        "epoch_time_s": {k: EPOCH_EXAMPLES / v for k, v in med.items()},
        "torch_loader_epoch_time_over_tensor": med["dltrain"] / med["dltrain-torch"],
        "allocator_tuned_over_default": {k: med[k] / med[f"{k}-malloc-default"] for k in ("bare", "dltrain")},
        "allocator": allocator.ENV,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# MNIST CNN pipelines ({report['date']}, {report['machine']})",
        "",
        f"batch {args.batch}, {args.precision}, {args.steps} timed steps, {args.repeats} interleaved repeats",
        "",
        "| pipeline | median samples/s | runs | epoch time (54k images) |",
        "|---|---|---|---|",
    ]
    for k, v in results.items():
        lines.append(
            f"| {k} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} | {report['epoch_time_s'][k]:.1f} s |"
        )
    lines += [
        "",
        f"- dltrain / bare loop: {report['dltrain_over_bare']:.3f} (per repeat: {', '.join(f'{p:.3f}' for p in pair)})",
        f"- epoch time, DataLoader path / tensor path: {report['torch_loader_epoch_time_over_tensor']:.2f}x",
        "- allocator settings of dltrain/allocator.py over glibc's default: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in report["allocator_tuned_over_default"].items()),
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _machine() -> str:
    import os
    import platform

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


if __name__ == "__main__":
    main()
