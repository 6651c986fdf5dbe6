"""report.md: the suite's summary.json as tables a reader can paste into an issue."""

from __future__ import annotations

from pathlib import Path

from dltrain.bench.cells import fig, num, stats, table
from dltrain.bench.markdown_scaling import model_sections, scaling_section
from dltrain.bench.report import Summary
from dltrain.bench.result import Config, Stats
from dltrain.bench.suite import VARIANT_KINDS


def _setup(cfg: Config) -> str:
    extra = (f", ZeRO-{cfg.deepspeed_stage}" if cfg.deepspeed_stage is not None else "") + (
        ", compile" if cfg.compile else ""
    )
    nodes = f" on {cfg.nnodes} nodes" if cfg.nnodes > 1 else ""
    return f"{cfg.world_size}{nodes}, {cfg.precision}{extra}"


def throughput_rows(configs: dict[str, Config]) -> list[list[str]]:
    rows = []
    for name, c in configs.items():
        if c.mode != "throughput":
            continue
        status = "ok" if not c.failed else f"{c.failed}/{c.runs} failed"
        tokens = fig(c, "tokens_per_s") + (
            f" ({fig(c, 'padded_tokens_per_s')} padded)" if "tokens_per_s" in c.figures else ""
        )
        rows.append(
            [
                name,
                c.kind,
                c.workload or "-",
                _setup(c),
                fig(c, "samples_per_s"),
                tokens,
                fig(c, "step_time_ms_p50"),
                fig(c, "step_time_ms_p90"),
                fig(c, "data_wait_share", 100, 2),
                fig(c, "achieved_flops_per_s", 1e-9),
                _mfu(c),
                fig(c, "peak_memory_mb", 1, 4),
                status,
            ]
        )
    return rows


def _mfu(cfg: Config) -> str:
    """MFU with the basis of its FLOPs: a text workload's counts its padded tokens (the work done),
    which a padding-free run would not do, so the figure is not comparable without the basis."""
    cell = fig(cfg, "mfu", 100, 3)
    return f"{cell} ({cfg.flops_basis})" if cell != "-" and cfg.flops_basis else cell


def render(summary: Summary, out_dir: Path) -> str:
    configs, env = summary.configs, summary.environment
    lines = [
        f"# Benchmark report: suite `{summary.suite}`",
        "",
        f"Created {summary.created_utc}; {summary.runs} runs ({summary.failed} failed), "
        f"{summary.repeats or 1} repeat(s): figures are mean ± std over repeats.",
        "",
        f"Environment: {env.get('gpu') or env.get('cpu', '?')} ({env.get('device', '?')}), torch "
        f"{env.get('torch', '?')}, "
        f"accelerate {env.get('accelerate', '?')}, git "
        f"{str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}.",
        "",
    ]
    peaks = summary.cpu_peak_flops_per_s
    if peaks:
        lines += [
            "CPU peak, **measured** in this run by a matmul microbenchmark (up to 1024²; bf16: the better of the "
            "bf16 and fp32 rates; the best sampled before and after every job, "
            + (f"{summary.cpu_threads} thread(s), times the processes of a job" if summary.cpu_threads else "all cores")
            + "): "
            + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items())
            + ". CPU MFU is against it.",
            "",
        ]
    lines += ["## Throughput (steady state: warm-up, evaluation and checkpointing excluded)", ""]
    lines += table(
        [
            "config",
            "kind",
            "workload",
            "world, precision",
            "samples/s",
            "tokens/s",
            "step p50 ms",
            "step p90 ms",
            "data wait %",
            "GFLOP/s",
            "MFU % (FLOPs basis)",
            "peak mem MB",
            "status",
        ],
        throughput_rows(configs),
    )
    lines += _outside_clock_section(configs)
    lines += [
        "## FLOPs per training sample (forward + backward)",
        "",
        "Measured with torch.utils.flop_counter.FlopCounterMode on one real micro-batch; text workloads padded to "
        "data.max_length for this cross-check (the analytic formula's assumption). Achieved FLOP/s of text "
        "workloads uses the FLOPs per padded token of a real dynamically padded batch.",
        "",
    ]
    lines += table(
        ["entry", "analytic", "measured", "measured / analytic", "parameters", "gradient MB"],
        [
            [
                k,
                num(v["flops_per_sample_analytic"]),
                num(v["flops_per_sample_measured"]),
                f"{v['flops_measured_over_analytic']:.3f}",
                f"{v['params']:,}",
                num(v["grad_bytes"] / 2**20),
            ]
            for k, v in summary.flops.items()
        ],
    )
    lines += _ttt_section(configs) + _accuracy_section(configs)
    lines += [
        "## dltrain vs baselines (per repeat, runs interleaved)",
        "",
        "ratio: dltrain samples/s / the baseline's (mean over each run's timed steps); p50 ratio: the "
        "baseline's median step time / dltrain's, which a burst of load on one side of a shared machine "
        "moves less. The target applies to the first.",
        "",
    ]
    lines += table(
        ["baseline", "dltrain config", "dltrain samples/s", "baseline samples/s", "ratio", "p50 ratio", "target"],
        [
            [
                b.config,
                b.dltrain_config,
                num(b.dltrain_samples_per_s),
                num(b.baseline_samples_per_s),
                stats(b.ratio),
                stats(b.ratio_p50_step),
                (f">= {b.target} " + ("met" if b.ratio and b.ratio.mean >= b.target else "NOT met"))
                if b.target
                else "-",
            ]
            for b in summary.baselines
        ],
    )
    lines += _overhead_section(summary)
    lines += scaling_section(summary)
    if summary.variants:
        lines += [
            "## Settings against their reference (same world size, precision, mode; per repeat, then averaged)",
            "",
            *table(
                ["config", "reference", "samples/s", "reference samples/s", "ratio"],
                [
                    [
                        v.config,
                        v.reference_config,
                        num(v.samples_per_s),
                        num(v.reference_samples_per_s),
                        stats(v.ratio),
                    ]
                    for v in summary.variants
                ],
            ),
        ]
    lines += model_sections(summary)
    lines += _failures(configs)
    lines += [
        "## Where the numbers are",
        "",
        "results.jsonl (one result per run), summary.json (aggregates), plots/*.png, runs/<config>-r<k>/ (each run's "
        "metrics.jsonl, summary.json, recipe.yaml), logs/ (each job's output).",
        "",
        "W&B runs were written offline (unless an API key is configured). Upload them later with:",
        "",
        f"    wandb sync {out_dir}/wandb/offline-run-*   # the suite summary run",
        f"    wandb sync {out_dir}/runs/*/wandb/offline-run-*   # every training run",
        "",
    ]
    return "\n".join(lines)


def _outside_clock_section(configs: dict[str, Config]) -> list[str]:
    """Evaluation and checkpoint writes, which the steady clock leaves out, timed on their own; and
    the clock's cross-check."""
    keys = ("eval_s", "checkpoint_s", "train_wall_s", "overall_samples_per_s", "clock_agreement")
    rows = [
        [
            name,
            fig(c, "eval_s"),
            fig(c, "checkpoint_s"),
            fig(c, "train_wall_s"),
            fig(c, "overall_samples_per_s"),
            fig(c, "clock_agreement"),
        ]
        for name, c in configs.items()
        if any(k in c.figures for k in keys)
    ]
    if not rows:
        return []
    return [
        "## Outside the clock: evaluation, checkpoints, and the clock's cross-check",
        "",
        "eval s and checkpoint s: time spent evaluating and writing checkpoints, left out of the steady figures. "
        "overall samples/s: samples trained / (training wall time - eval - checkpoint), warm-up included; "
        "clock agreement: steady samples/s / overall samples/s (above 1 by the warm-up's share).",
        "",
        *table(["config", "eval s", "checkpoint s", "training wall s", "overall samples/s", "clock agreement"], rows),
    ]


def _ttt_section(configs: dict[str, Config]) -> list[str]:
    rows = []
    for name, c in configs.items():
        if c.mode != "time_to_target":
            continue
        t = c.target or {}
        ok = c.runs - c.failed
        rows.append(
            [
                name,
                f"{t.get('metric', '?')} {'>=' if t.get('mode', 'max') == 'max' else '<='} {t.get('value', '?')}",
                fig(c, "time_to_target_s"),
                f"{c.reached}/{ok}",
                fig(c, t.get("metric", ""), 1, 4),
                fig(c, "wall_s"),
            ]
        )
    return [
        "## Time to target (MLPerf-style: from before the data is touched to the first evaluation at the target)",
        "",
        *table(["config", "target", "time to target s", "reached", "final value", "wall s"], rows),
    ]


def _accuracy_section(configs: dict[str, Config]) -> list[str]:
    rows = []
    for name, c in configs.items():
        if c.kind in ("dltrain", *VARIANT_KINDS):
            keys = [k for k in sorted(c.figures) if "/" in k]
            if keys:
                rows.append([name, ", ".join(f"{k} {fig(c, k, 1, 4)}" for k in keys)])
    return ["## Final metrics (end of each run)", "", *table(["config", "metrics"], rows)]


def _failures(configs: dict[str, Config]) -> list[str]:
    rows = [[name, str(c.failed), (c.errors[-1] or "?").replace("|", "/")] for name, c in configs.items() if c.failed]
    return ["## Failed runs", "", *table(["config", "failed", "last error"], rows)] if rows else []


def write_report(summary: Summary, out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(render(summary, out_dir))
    return path


def _overhead_section(summary: Summary) -> list[str]:
    """One row per bare baseline; nothing when the suite ran none."""
    if not summary.overhead:
        return []

    def us(s: Stats | None) -> str:
        return "-" if s is None else f"{s.mean:+.0f}" + (f" ± {s.std:.0f}" if s.n > 1 else "")

    return [
        "## Framework overhead (dltrain - bare loop, per step)",
        "",
        "Microseconds per step dltrain spends beyond the bare loop of the same model, data and batch, "
        "per repeat then averaged: from the median step times (p50) and from the timed window's mean "
        "(global batch / samples/s). Negative: dltrain was faster. Where it goes: "
        "`python -m dltrain.bench.overhead RECIPE` (calls and Python time per step, by function).",
        "",
        *table(
            [
                "baseline",
                "dltrain config",
                "bare step p50 (us)",
                "overhead p50 (us/step)",
                "overhead mean (us/step)",
                "share of the bare step",
            ],
            [
                [
                    r.config,
                    r.dltrain_config,
                    num(r.bare_step_us_p50),
                    us(r.overhead_us_p50),
                    us(r.overhead_us_mean),
                    "-" if r.overhead_share_p50 is None else f"{r.overhead_share_p50:+.1%}",
                ]
                for r in summary.overhead
            ],
        ),
    ]
