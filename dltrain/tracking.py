"""Where numbers go: metrics.jsonl (always), Weights & Biases (offline unless a key is set),
summary.json with the run's environment, and PNG plots of the curves."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import dltrain
from dltrain import allocator, shipped


def wandb_mode() -> str:
    """Offline unless the user configured a key: never a login prompt, never a network wait."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class RunLog:
    """Writes metrics.jsonl on the main process and forwards the same records to the trackers."""

    def __init__(self, accelerator, run_dir: Path, recipe, run_id: str | None = None):
        self.accelerator, self.run_dir = accelerator, run_dir
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run_id = run_id
        if recipe.tracking.wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            wandb_kwargs = {"dir": str(run_dir), "mode": wandb_mode(), "tags": recipe.tracking.tags, "name": run_dir.name}
            if run_id:
                wandb_kwargs.update(id=run_id, resume="allow")
            accelerator.init_trackers(
                recipe.tracking.project,
                config=recipe.model_dump(mode="json", exclude={"profiles"}),
                init_kwargs={"wandb": wandb_kwargs},
            )
            if self.main:
                self.wandb_run_id = accelerator.get_tracker("wandb").run.id

    def log(self, record: dict, step: int) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        self.accelerator.log(numbers, step=step)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return read_records(self.path)


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash or a full disk is left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _git(*args: str) -> str | None:
    """git's answer about the checkout dltrain runs from; None for an installed dltrain (whose
    site-packages may sit inside some other repository, e.g. a project's .venv)."""
    root = shipped.import_root()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5, cwd=root)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=root)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    """An optional package's version (transformers is the [nlp] extra), None when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(accelerator, recipe) -> dict:
    import accelerate

    device = accelerator.device
    env = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": _version("transformers"),
        "dltrain": dltrain.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "host_allocator": allocator.current(),
        "device": device.type,
        "world_size": accelerator.num_processes,
        "num_machines": int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", "1"))),
        "precision": recipe.train.precision,
        "seed": recipe.train.seed,
        "deepspeed_stage": recipe.deepspeed.zero_stage if recipe.deepspeed else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# Logged per step but not learning curves.
_NOT_CURVES = {"samples_per_s", "lr", "examples", "skipped_step", "skipped_steps", "nonfinite_steps", "mfu", "mfu_real",
               "flops_per_s", "flops_per_s_real", "tokens_per_s", "padded_tokens_per_s"}


def plot_curves(records: list[dict], out_dir: Path) -> list[Path]:
    """loss.png and accuracy.png (or the workload's metric), train and validation against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith(("train/", "val/"))})
    for metric in metrics:
        if metric in _NOT_CURVES:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["step"], r[f"{split}/{metric}"]) for r in records if f"{split}/{metric}" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: train and validation")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
