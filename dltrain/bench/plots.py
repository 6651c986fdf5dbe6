"""PNG plots of a suite (matplotlib) and its summary run in Weights & Biases."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dltrain.bench.report import Summary
from dltrain.bench.result import CommRun, Result, ScalingRow


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_scaling(summary: Summary, out: Path) -> Path | None:
    rows = summary.scaling
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[ScalingRow]] = {}
    for r in rows:
        groups.setdefault(
            f"{r.entry} {r.precision}" + (f" ZeRO-{r.deepspeed_stage}" if r.deepspeed_stage is not None else ""), []
        ).append(r)
    for label, rs in groups.items():
        xs = [r.world_size for r in rs]
        (line,) = ax.plot(xs, [r.samples_per_s for r in rs], "o-", label=label)
        base = next(r.samples_per_s for r in rs if r.world_size == 1)
        ax.plot(xs, [base * x for x in xs], "--", color=line.get_color(), alpha=0.5, label=f"{label} ideal")
    ax.set_xticks(sorted({r.world_size for r in rows}))
    ax.set_xlabel("world size (processes)")
    ax.set_ylabel("train samples/s")
    ax.set_title("Throughput vs world size (dashed: ideal linear)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "throughput_vs_world.png")


def _bars(items: list[tuple[str, float, float]], ylabel: str, title: str, path: Path) -> Path | None:
    if not items:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(items)), 4))
    ax.bar(range(len(items)), [v for _, v, _ in items], yerr=[e for _, _, e in items], capsize=3)
    ax.set_xticks(range(len(items)), [n for n, _, _ in items], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _figure_items(
    summary: Summary, key: str, scale: float = 1.0, mode: str | None = None
) -> list[tuple[str, float, float]]:
    return [
        (name, c.figures[key].mean * scale, c.figures[key].std * scale)
        for name, c in summary.configs.items()
        if key in c.figures and (mode is None or c.mode == mode)
    ]


def plot_loss_curves(summary: Summary, results: list[Result], out: Path) -> Path | None:
    """Training loss against step for the first repeat of each configuration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for res in results:
        path = Path(res.run_dir) / "metrics.jsonl"
        if not res.ok or res.repeat or not res.run_dir or not path.is_file():
            continue
        pts = [
            (r["step"], r["train/loss"]) for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r
        ]
        if pts:
            ax.plot(*zip(*pts), label=res.config)
            drawn += 1
    if not drawn:
        _plt().close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title("Training loss (first repeat of each run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out / "loss_curves.png")


def plot_comm(comm: list[CommRun], out_dir: Path) -> Path | None:
    """Bus bandwidth against message size, one line per collective and world size."""
    rows = [r for c in comm for r in c.rows]
    if not rows:
        return None
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = _plt().subplots(figsize=(7, 4))
    for op, world in sorted({(r.op, r.world_size) for r in rows}):
        pts = sorted((r.bytes, r.busbw_GBps) for r in rows if (r.op, r.world_size) == (op, world))
        ax.plot([b for b, _ in pts], [g for _, g in pts], marker="o", ms=3, label=f"{op}, N={world}")
    ax.set(
        xscale="log", yscale="log", xlabel="message bytes", ylabel="bus bandwidth GB/s", title="Collectives (measured)"
    )
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "plots" / "comm_busbw.png")


def make_plots(summary: Summary, results: list[Result], out_dir: Path) -> list[Path]:
    out = out_dir / "plots"
    out.mkdir(exist_ok=True)
    paths = [
        plot_comm(summary.comm, out_dir),
        plot_scaling(summary, out),
        _bars(
            _figure_items(summary, "mfu", 100), "MFU %", "Model FLOPs utilization per configuration", out / "mfu.png"
        ),
        _bars(
            _figure_items(summary, "samples_per_s", mode="throughput"),
            "train samples/s",
            "Steady-state throughput",
            out / "throughput.png",
        ),
        _bars(
            _figure_items(summary, "time_to_target_s", mode="time_to_target"),
            "seconds",
            "Time to target",
            out / "time_to_target.png",
        ),
        plot_loss_curves(summary, results, out),
    ]
    return [p for p in paths if p is not None]


def log_wandb(summary: Summary, plots: list[Path], out_dir: Path) -> str | None:
    """One W&B run per suite: the per-config table, the headline figures, the plots as images."""
    from dltrain.tracking import wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = wandb_mode()
    if mode == "disabled":
        return None
    import wandb  # after the check: a second or two of import for nothing when disabled

    keys = ["samples_per_s", "tokens_per_s", "step_time_ms_p50", "mfu", "time_to_target_s"]
    columns = ["config", "kind", "workload", "mode", "world_size", "precision", "runs", "failed"] + keys
    rows = [
        [name, c.kind, c.workload, c.mode, c.world_size, c.precision, c.runs, c.failed] + [c.mean(k) for k in keys]
        for name, c in summary.configs.items()
    ]
    run = wandb.init(
        project="dltrain-bench",
        name=f"bench-{summary.suite}",
        job_type="benchmark",
        dir=str(out_dir),
        mode=mode,
        config={
            "suite": summary.suite,
            "repeats": summary.repeats,
            "environment": summary.environment,
        },
    )
    try:
        payload = {"results": wandb.Table(columns=columns, data=rows)}
        payload |= {f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}
        run.log(payload)
        for name, c in summary.configs.items():
            for k in keys:
                if k in c.figures:
                    run.summary[f"{name}/{k}"] = c.figures[k].mean
        for b in summary.baselines:
            if b.ratio:
                run.summary[f"{b.config}/ratio"] = b.ratio.mean
        return run.id
    finally:
        run.finish()
