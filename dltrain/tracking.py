"""Where numbers go: metrics.jsonl (always), the recipe's Accelerate trackers (`tracking.trackers`:
W&B, offline unless you are logged in; TensorBoard under RUN_DIR/tensorboard; MLflow, ...),
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
    """WANDB_MODE when set; else online when W&B finds credentials the way it does itself
    (WANDB_API_KEY, its settings files, a .netrc entry for WANDB_BASE_URL's host, so a self-hosted
    server counts), else offline: never a login prompt, never a network wait to check a key."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        import wandb
    except ImportError:
        return "offline"
    os.environ.setdefault("WANDB_SILENT", "true")  # no "API key is configured" note on every run
    try:
        return "online" if wandb.login(prompt=False, verify=False) else "offline"
    except Exception:  # noqa: BLE001  an unreadable settings file or netrc: W&B would fail the same way online
        return "offline"


def wandb_line(run) -> str | None:
    """The one line that says where a W&B run went: its URL online; offline, its folder and the
    command that uploads it (an offline run is otherwise silent: WANDB_SILENT); None when disabled."""
    if getattr(run, "offline", False):
        folder = Path(run.dir).parent  # run.dir is the run's files/ folder inside offline-run-*
        return f"  W&B run (offline): {folder}; upload it with `wandb sync {folder}`"
    url = getattr(run, "url", None)
    return f"  W&B run: {url}" if url else None


# The pip package of each tracker Accelerate drives (all named as their tracker today).
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def check_trackers(names: list[str]) -> None:
    """Every tracker the recipe names must be installed: Accelerate drops a missing one silently."""
    from accelerate.tracking import get_available_trackers

    from dltrain.recipe import RecipeError

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise RecipeError(
                f"tracking.trackers names {name}, which is not installed: pip install "
                f"{TRACKER_PACKAGES.get(name, name)}, or drop it from tracking.trackers"
            )


def _flat_config(tree: dict, prefix: str = "") -> dict:
    """{'optim.lr': 0.001, ...}: the hyperparameter form TensorBoard, MLflow and the like take
    (scalars only: a list or None becomes its text)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat_config(value, name + ".")
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class RunLog:
    """Writes metrics.jsonl on the main process and forwards the same records to the trackers."""

    def __init__(self, accelerator, run_dir: Path, recipe, run_id: str | None = None):
        self.accelerator, self.run_dir = accelerator, run_dir
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run_id = run_id
        if recipe.tracking.trackers:
            self._start_trackers(recipe, run_dir, run_id)

    def _start_trackers(self, recipe, run_dir: Path, run_id: str | None) -> None:
        acc, cfg = self.accelerator, recipe.tracking
        init_kwargs = {}
        if "wandb" in cfg.trackers:
            os.environ.setdefault("WANDB_SILENT", "true")
            wandb_kwargs = {
                "dir": str(run_dir),
                "mode": wandb_mode(),
                "tags": cfg.tags,
                "name": cfg.run_name or run_dir.name,
                "entity": cfg.entity,
                "group": cfg.group,
            }
            if run_id:
                wandb_kwargs.update(id=run_id, resume="allow")
            init_kwargs["wandb"] = wandb_kwargs
        # TensorBoard writes under logging_dir/<project>: RUN_DIR/tensorboard/<project>.
        acc.project_configuration.logging_dir = str(run_dir / "tensorboard")
        acc.init_trackers(cfg.project, config=None, init_kwargs=init_kwargs)
        config = recipe.model_dump(mode="json", exclude={"profiles"})
        for tracker in acc.trackers:  # W&B keeps the nested recipe; the others take flat scalars
            tracker.store_init_configuration(config if tracker.name == "wandb" else _flat_config(config))
        if not self.main:
            return
        if "wandb" in cfg.trackers:
            run = acc.get_tracker("wandb", unwrap=True)
            self.wandb_run_id = run.id
            if (line := wandb_line(run)) is not None:
                print(line, flush=True)
        if "tensorboard" in cfg.trackers:
            print(f"  TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}", flush=True)

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
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5, cwd=root
        )
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
        # The engine's own (a deepspeed.config_file or a launcher's config may set it, not the recipe's key).
        "deepspeed_stage": getattr(accelerator.state.deepspeed_plugin, "zero_stage", None),
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
_NOT_CURVES = {
    "samples_per_s",
    "lr",
    "examples",
    "skipped_step",
    "skipped_steps",
    "nonfinite_steps",
    "mfu",
    "mfu_real",
    "flops_per_s",
    "flops_per_s_real",
    "tokens_per_s",
    "padded_tokens_per_s",
}


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
