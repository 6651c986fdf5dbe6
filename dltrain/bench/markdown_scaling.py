"""report.md's sections on scaling (dltrain.bench.scaling): measured scaling, the collectives
timed on this host and their fits, the step model checked against measured runs, and the
projection to many GPUs with the entries refused one."""

from __future__ import annotations

from dltrain.bench.cells import num, size, table
from dltrain.bench.report import Summary
from dltrain.bench.result import CommRun, ProjectionRow, ValidationRow


def scaling_section(summary: Summary) -> list[str]:
    head = [
        "## Scaling (measured, constant per-device batch)",
        "",
        "efficiency = throughput(N) / (N x throughput(1)).",
        "",
    ]
    return head + table(
        ["config", "world", "nodes", "samples/s", "speedup", "efficiency"],
        [
            [
                s.config,
                str(s.world_size),
                str(s.nnodes),
                num(s.samples_per_s),
                f"{s.speedup:.2f}",
                f"{s.efficiency:.2f}",
            ]
            for s in summary.scaling
        ],
    )


def model_sections(summary: Summary) -> list[str]:
    """Communication, the step model's check, the projection and what it refused."""
    lines = comm_section(summary.comm)
    lines += _validation_section(summary.validation)
    lines += _projection_section(summary.projection)
    lines += [f"Not projected: {entry}: {why}." for entry, why in summary.projection_refused.items()] + [""]
    return lines


def comm_section(comm: list[CommRun]) -> list[str]:
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
        env = c.environment
        out += [
            f"### {c.backend} on {c.device}, {c.world_size} processes ({env.get('host', '?')}, torch "
            f"{env.get('torch', '?')}, {env.get('date_utc', '?')} UTC)",
            "",
        ]
        out += table(
            ["range", "op", "alpha us", "busbw GB/s", "worst miss", "points"],
            [
                [
                    f.range,
                    f.op,
                    num(f.alpha_s * 1e6),
                    num(f.busbw / 1e9) if f.busbw < 1e14 else "inf",
                    f"{f.max_rel_err:.0%}",
                    str(f.points),
                ]
                for f in sorted(c.fits, key=lambda f: (f.op, f.lo))
            ],
        )
        sizes = sorted({r.bytes for r in c.rows})
        ops = [
            op for op in ("all_reduce", "all_gather", "reduce_scatter", "broadcast") if any(r.op == op for r in c.rows)
        ]
        by = {(r.op, r.bytes): r for r in c.rows}
        out += table(
            ["bytes", *(f"{op} us / busbw GB/s" for op in ops)],
            [
                [
                    size(n),
                    *(
                        f"{num(by[op, n].time_us)} / {num(by[op, n].busbw_GBps)}" if (op, n) in by else "-"
                        for op in ops
                    ),
                ]
                for n in sizes
            ],
        )
    return out


def _validation_section(rows: list[ValidationRow]) -> list[str]:
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
    return head + table(
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
                r.config,
                str(r.world_size),
                num(r.world1_p50_ms),
                num(r.slowest_of_n_ms),
                f"{r.colocated_factor:.3f}",
                num(r.step1_ms),
                str(r.buckets),
                num(r.comm_ms),
                num(r.exposed_ms),
                num(r.other_collectives_ms),
                num(r.predicted_ms),
                num(r.no_overlap_ms),
                num(r.measured_ms),
                f"{r.error:+.1%}",
            ]
            for r in rows
        ],
    )


def _projection_section(rows: list[ProjectionRow]) -> list[str]:
    sources = sorted({r.compute_source for r in rows})
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
    return head + table(
        ["entry", "N", "nodes", "compute ms", "comm ms", "exposed ms", "step ms", "efficiency", "samples/s", "label"],
        [
            [
                r.entry,
                str(r.world_size),
                str(r.nodes),
                num(r.compute_ms),
                num(r.comm_ms),
                num(r.exposed_ms),
                num(r.step_ms),
                f"{r.efficiency:.3f}",
                num(r.samples_per_s),
                r.label,
            ]
            for r in rows
        ],
    )
