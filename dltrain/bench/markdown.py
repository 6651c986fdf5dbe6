"""report.md: the suite's summary.json as tables a reader can paste into an issue."""

from __future__ import annotations

from pathlib import Path

from dltrain.bench.overhead import markdown_lines as overhead_lines
from dltrain.bench.result import Config, Stats
from dltrain.bench.suite import VARIANT_KINDS


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e3:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _fig(cfg: Config, key: str, scale: float = 1.0, digits: int = 3) -> str:
    f = cfg.figures.get(key)
    if not f:
        return "-"
    text = _num(f.mean * scale, digits)
    return text + (f" ± {_num(f.std * scale, 2)}" if f.n > 1 else "")


def _ratio(fig: Stats | None) -> str:
    if not fig:
        return "-"
    return _num(fig.mean) + (f" ± {_num(fig.std, 2)}" if fig.n > 1 else "")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


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
        tokens = _fig(c, "tokens_per_s") + (
            f" ({_fig(c, 'padded_tokens_per_s')} padded)" if "tokens_per_s" in c.figures else ""
        )
        rows.append(
            [
                name,
                c.kind,
                c.workload or "-",
                _setup(c),
                _fig(c, "samples_per_s"),
                tokens,
                _fig(c, "step_time_ms_p50"),
                _fig(c, "step_time_ms_p90"),
                _fig(c, "data_wait_share", 100, 2),
                _fig(c, "achieved_flops_per_s", 1e-9),
                _mfu(c),
                _fig(c, "peak_memory_mb", 1, 4),
                status,
            ]
        )
    return rows


def _mfu(cfg: Config) -> str:
    """MFU with the basis of its FLOPs: a text workload's counts its padded tokens (the work done),
    which a padding-free run would not do, so the figure is not comparable without the basis."""
    cell = _fig(cfg, "mfu", 100, 3)
    return f"{cell} ({cfg.flops_basis})" if cell != "-" and cfg.flops_basis else cell


def render(summary: dict, out_dir: Path) -> str:
    configs, env = summary["configs"], summary.get("environment") or {}
    lines = [
        f"# Benchmark report: suite `{summary['suite']}`",
        "",
        f"Created {summary['created_utc']}; {summary['runs']} runs ({summary['failed']} failed), "
        f"{summary.get('repeats') or 1} repeat(s): figures are mean ± std over repeats.",
        "",
        f"Environment: {env.get('gpu') or env.get('cpu', '?')} ({env.get('device', '?')}), torch "
        f"{env.get('torch', '?')}, "
        f"accelerate {env.get('accelerate', '?')}, git "
        f"{str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}.",
        "",
    ]
    peaks = summary.get("cpu_peak_flops_per_s") or {}
    if peaks:
        lines += [
            "CPU peak, **measured** in this run by a matmul microbenchmark (up to 1024²; bf16: the better of the "
            "bf16 and fp32 rates; the best sampled before and after every job, "
            + (
                f"{summary['cpu_threads']} thread(s), times the processes of a job"
                if summary.get("cpu_threads")
                else "all cores"
            )
            + "): "
            + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items())
            + ". CPU MFU is against it.",
            "",
        ]
    lines += ["## Throughput (steady state: warm-up, evaluation and checkpointing excluded)", ""]
    lines += _table(
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
    lines += _table(
        ["entry", "analytic", "measured", "measured / analytic", "parameters", "gradient MB"],
        [
            [
                k,
                _num(v["flops_per_sample_analytic"]),
                _num(v["flops_per_sample_measured"]),
                f"{v['flops_measured_over_analytic']:.3f}",
                f"{v['params']:,}",
                _num(v["grad_bytes"] / 2**20),
            ]
            for k, v in (summary.get("flops") or {}).items()
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
    lines += _table(
        ["baseline", "dltrain config", "dltrain samples/s", "baseline samples/s", "ratio", "p50 ratio", "target"],
        [
            [
                b["config"],
                b["dltrain_config"],
                _num(b["dltrain_samples_per_s"]),
                _num(b["baseline_samples_per_s"]),
                _ratio(b.get("ratio")),
                _ratio(b.get("ratio_p50_step")),
                (f">= {b['target']} " + ("met" if b["ratio"] and b["ratio"].mean >= b["target"] else "NOT met"))
                if b["target"]
                else "-",
            ]
            for b in summary["baselines"]
        ],
    )
    lines += overhead_lines(summary)  # dltrain.bench.overhead: us per step over the bare loop
    lines += [
        "## Scaling (measured, constant per-device batch)",
        "",
        "efficiency = throughput(N) / (N x throughput(1)).",
        "",
    ]
    lines += _table(
        ["config", "world", "nodes", "samples/s", "speedup", "efficiency"],
        [
            [
                s["config"],
                str(s["world_size"]),
                str(s["nnodes"]),
                _num(s["samples_per_s"]),
                f"{s['speedup']:.2f}",
                f"{s['efficiency']:.2f}",
            ]
            for s in summary["scaling"]
        ],
    )
    if summary.get("variants"):
        lines += [
            "## Settings against their reference (same world size, precision, mode; per repeat, then averaged)",
            "",
            *_table(
                ["config", "reference", "samples/s", "reference samples/s", "ratio"],
                [
                    [
                        v["config"],
                        v["reference_config"],
                        _num(v["samples_per_s"]),
                        _num(v["reference_samples_per_s"]),
                        _ratio(v["ratio"]),
                    ]
                    for v in summary["variants"]
                ],
            ),
        ]
    lines += comm_section(summary.get("comm", []))
    lines += _validation_section(summary.get("validation", []))
    lines += _projection_section(summary["projection"])
    lines += [f"Not projected: {entry}: {why}." for entry, why in (summary.get("projection_refused") or {}).items()] + [
        ""
    ]
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
            _fig(c, "eval_s"),
            _fig(c, "checkpoint_s"),
            _fig(c, "train_wall_s"),
            _fig(c, "overall_samples_per_s"),
            _fig(c, "clock_agreement"),
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
        *_table(["config", "eval s", "checkpoint s", "training wall s", "overall samples/s", "clock agreement"], rows),
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
                _fig(c, "time_to_target_s"),
                f"{c.reached}/{ok}",
                _fig(c, t.get("metric", ""), 1, 4),
                _fig(c, "wall_s"),
            ]
        )
    return [
        "## Time to target (MLPerf-style: from before the data is touched to the first evaluation at the target)",
        "",
        *_table(["config", "target", "time to target s", "reached", "final value", "wall s"], rows),
    ]


def _accuracy_section(configs: dict[str, Config]) -> list[str]:
    rows = []
    for name, c in configs.items():
        if c.kind in ("dltrain", *VARIANT_KINDS):
            keys = [k for k in sorted(c.figures) if "/" in k]
            if keys:
                rows.append([name, ", ".join(f"{k} {_fig(c, k, 1, 4)}" for k in keys)])
    return ["## Final metrics (end of each run)", "", *_table(["config", "metrics"], rows)]


def comm_section(comm: list[dict]) -> list[str]:
    """The collective timings and the alpha-beta fits of each world size measured."""
    if not comm:
        return []
    out = [
        "## Communication (measured: `dltrain bench comm`)",
        "",
        "time: the slowest rank's median over calls timed one by one (the mean beside it in comm.jsonl); algbw = "
        "bytes / time; busbw = algbw x "
        "2(N-1)/N (all-reduce), x (N-1)/N (all-gather, reduce-scatter), x 1 (broadcast), as nccl-tests defines them. "
        "Fit: time = alpha + factor x bytes / busbw per size range, least squares on relative error.",
        "",
    ]
    for c in comm:
        env = c.get("environment") or {}
        out += [
            f"### {c['backend']} on {c['device']}, {c['world_size']} processes ({env.get('host', '?')}, torch "
            f"{env.get('torch', '?')}, {env.get('date_utc', '?')} UTC)",
            "",
        ]
        out += _table(
            ["range", "op", "alpha us", "busbw GB/s", "worst miss", "points"],
            [
                [
                    f["range"],
                    f["op"],
                    _num(f["alpha_s"] * 1e6),
                    _num(f["busbw"] / 1e9) if f["busbw"] < 1e14 else "inf",
                    f"{f['max_rel_err']:.0%}",
                    str(f["points"]),
                ]
                for f in sorted(c["fits"], key=lambda f: (f["op"], f["lo"]))
            ],
        )
        sizes = sorted({r["bytes"] for r in c.get("rows", [])})
        ops = [
            op
            for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
            if any(r["op"] == op for r in c.get("rows", []))
        ]
        by = {(r["op"], r["bytes"]): r for r in c.get("rows", [])}
        out += _table(
            ["bytes", *(f"{op} us / busbw GB/s" for op in ops)],
            [
                [
                    _bytes(n),
                    *(
                        f"{_num(by[op, n]['time_us'])} / {_num(by[op, n]['busbw_GBps'])}" if (op, n) in by else "-"
                        for op in ops
                    ),
                ]
                for n in sizes
            ],
        )
    return out


def _bytes(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _validation_section(rows: list[dict]) -> list[str]:
    head = [
        "## The step model against measured runs",
        "",
        "predicted = step(1) + exposed communication. step(1): the world-1 run's step-time distribution at its "
        "0.5^(1/N) quantile (the median step of N ranks waits for the slowest of N independent batches), times the "
        "rank factor (the harness's step profile in N processes at once, each model inside DDP on a group of its own, "
        "over the profile alone: N ranks share this host's cores, caches and memory bandwidth, and DDP copies "
        "gradients "
        "into buckets; on GPUs each rank has its own device). Exposed: DDP's buckets (torch's "
        "assignment, in the order gradients became ready in the profile) all-reduced one after another from when each "
        "is ready, alpha + 2(N-1)/N x bytes / busbw from the fits above, past the end of backward; plus dltrain's "
        "per-step loss all-reduce and DDP's buffer broadcast. no overlap: all of it after backward. "
        "error = predicted / measured - 1 (median steps).",
        "",
    ]
    return head + _table(
        [
            "config",
            "N",
            "world-1 p50 ms",
            "slowest of N ms",
            "rank x",
            "step(1) ms",
            "buckets",
            "comm ms",
            "exposed ms",
            "other coll. ms",
            "predicted ms",
            "no-overlap ms",
            "measured ms",
            "error",
        ],
        [
            [
                r["config"],
                str(r["world_size"]),
                _num(r.get("world1_p50_ms")),
                _num(r.get("slowest_of_n_ms")),
                f"{r.get('colocated_factor', 1.0):.3f}",
                _num(r["step1_ms"]),
                str(r["buckets"]),
                _num(r["comm_ms"]),
                _num(r["exposed_ms"]),
                _num(r["other_collectives_ms"]),
                _num(r["predicted_ms"]),
                _num(r["no_overlap_ms"]),
                _num(r["measured_ms"]),
                f"{r['error']:+.1%}",
            ]
            for r in rows
        ],
    )


def _projection_section(rows: list[dict]) -> list[str]:
    sources = sorted({r["compute_source"] for r in rows})
    head = [
        "## Projection to 8..1024 GPUs (PROJECTED, not measured)",
        "",
        "step(N) = one GPU's step + exposed communication, the step model above with NCCL on GPU links "
        "(dltrain.bench.perfmodel.NcclModel: ring or tree, LL or Simple, latencies from NCCL's tuning model; NVLink 4 "
        "busbw 450 GB/s in a node, 8 NDR NICs x 50 GB/s x 0.9 across nodes). Assumptions: gradients become ready "
        "at the same fractions of backward as in the harness's step profile (on this suite's device), and backward "
        "takes the same share of the step; the datasheet path leaves out kernel-launch and framework overheads, "
        "which dominate small models' GPU steps (give a gpu_single directory for those); "
        "compute: " + ("; ".join(sources) if sources else "none (no GPU results and no FLOP count)") + ".",
        "",
    ]
    return head + _table(
        ["entry", "N", "nodes", "compute ms", "comm ms", "exposed ms", "step ms", "efficiency", "samples/s", "label"],
        [
            [
                r["entry"],
                str(r["world_size"]),
                str(r["nodes"]),
                _num(r["compute_ms"]),
                _num(r["comm_ms"]),
                _num(r["exposed_ms"]),
                _num(r["step_ms"]),
                f"{r['efficiency']:.3f}",
                _num(r["samples_per_s"]),
                r["label"],
            ]
            for r in rows
        ],
    )


def _failures(configs: dict[str, Config]) -> list[str]:
    rows = [[name, str(c.failed), (c.errors[-1] or "?").replace("|", "/")] for name, c in configs.items() if c.failed]
    return ["## Failed runs", "", *_table(["config", "failed", "last error"], rows)] if rows else []


def write_report(summary: dict, out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(render(summary, out_dir))
    return path
