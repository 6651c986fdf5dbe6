"""`dltrain bench`: the command line of the pipeline (see dltrain/bench/__init__.py for its stages).

Exit codes of `dltrain bench SUITE`: 0 every run ok; 3 (EXIT_RUNS_FAILED) at least one run failed,
timed out or was cut short, the results and the report written all the same (also with
--no-report); 2 bad input (suite, recipe, option, output directory); 130 interrupted (the job it
cut is recorded as such). `dltrain bench compare`: 1 on a regression beyond noise.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path

from dltrain.bench import ttt

EXIT_RUNS_FAILED = 3  # some runs of the suite failed: automation (CI, a nightly job) must see it


def default_output_dir(suite_name: str) -> Path:
    return Path("runs") / "bench" / f"{suite_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def finish(out_dir: Path, wandb: bool = True, gpu_results: str | None = None):
    """summary.json, report.md, plots and the W&B summary run from the results in out_dir."""
    from dltrain.bench.markdown import write_report
    from dltrain.bench.plots import log_wandb, make_plots
    from dltrain.bench.report import build_summary
    from dltrain.bench.result import read_results

    summary = build_summary(out_dir, gpu_results)
    plots = make_plots(summary, read_results(out_dir), out_dir)
    write_report(summary, out_dir)
    if wandb:
        log_wandb(summary, plots, out_dir)
    return summary


def bench(
    suite_path: str,
    output_dir: str | None = None,
    repeats: int | None = None,
    dry_run: bool = False,
    only: list[str] = (),
    report: bool = True,
) -> int:
    from dltrain.bench.runner import node_info, run_suite
    from dltrain.bench.suite import load_suite, resolve_path, select
    from dltrain.recipe import RecipeError, read_yaml

    path = resolve_path(suite_path)
    if path.is_file() and ttt.is_record_suite(raw := read_yaml(path, what="suite")):
        return bench_records(path, raw, output_dir, dry_run, only)
    suite = load_suite(suite_path)
    jobs = select(suite, only)  # the plan, made once: every job's recipe parsed here
    if not jobs:
        which = f"matches --only {' '.join(only)}" if only else "fits its world sizes, nodes and max_procs_per_node"
        raise RecipeError(f"suite {suite.name}: no job {which}")
    out_dir = Path(output_dir) if output_dir else default_output_dir(suite.name)
    if not dry_run:
        check_output_dir(out_dir)
    results = run_suite(suite, out_dir, repeats=repeats, dry_run=dry_run, jobs=jobs)
    if dry_run or node_info()[0] > 0:
        return 0
    failed = sum(not r.ok for r in results)
    ok = f"dltrain bench: {len(results) - failed}/{len(results)} runs ok"
    if failed:
        ok += f" ({failed} failed: exit code {EXIT_RUNS_FAILED}; each one's error is in results.jsonl and the report)"
    if report:
        finish(out_dir, wandb=suite.wandb_summary)
        print(f"{ok}; report in {out_dir / 'report.md'}")
    else:
        print(f"{ok}; report with `dltrain bench report {out_dir}`")
    return EXIT_RUNS_FAILED if failed else 0


def bench_records(path: Path, raw: dict, output_dir: str | None, dry_run: bool, only: list[str]) -> int:
    """A record suite (dltrain.bench.ttt): every record's seeds and reference, then the table."""
    suite = ttt.load_record_suite(path, raw)
    known = {r.name for r in suite.records}
    if set(only) - known:
        from dltrain.recipe import RecipeError

        raise RecipeError(
            f"suite {suite.name}: no record {', '.join(sorted(set(only) - known))} (records: "
            f"{', '.join(sorted(known))})"
        )
    if dry_run:
        for rec in (r for r in suite.records if not only or r.name in only):
            sets = [*rec.overrides, "train.seed=S"]
            print(
                f"[{rec.name}] seeds {rec.seeds}: dltrain train {rec.recipe}"
                + (f" --profile {rec.profile}" if rec.profile else "")
                + "".join(f" --set {s}" for s in sets)
            )
        return 0
    out_dir = Path(output_dir) if output_dir else default_output_dir(suite.name)
    check_output_dir(out_dir)
    try:
        rows = ttt.run_records(suite, out_dir, only)
    except ttt.RecordsInterrupted:
        print(f"dltrain bench: interrupted; report of what finished in {out_dir / 'report.md'}")
        return EXIT_RUNS_FAILED
    failed = sum(len(r.failed_seeds) + r.reference_failed for r in rows)
    print(f"dltrain bench: {len(rows)} records, {failed} failed runs; report in {out_dir / 'report.md'}")
    return EXIT_RUNS_FAILED if failed else 0


def check_output_dir(out_dir: Path) -> None:
    """A directory bench can create and write its results in, holding none of an earlier suite's;
    checked without creating it, so a suite refused later leaves nothing behind."""
    from dltrain.recipe import RecipeError

    if (out_dir / "results.jsonl").exists():
        raise RecipeError(f"{out_dir} already holds benchmark results: choose another --output-dir")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "no permission to write there"
        raise RecipeError(f"cannot write to --output-dir {out_dir} ({existing}: {why}): choose another")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (`bench SUITE`), or compare two (`bench compare OLD NEW`)",
        description="`dltrain bench SUITE`: run a suite (a name under benchmarks/suites/ or a YAML path). "
        "`dltrain bench compare OLD_DIR NEW_DIR`: per-figure ratios, exit 1 on a regression beyond noise.",
        epilog=f"exit codes: 0 every run ok; {EXIT_RUNS_FAILED} a run failed, timed out or was cut short "
        "(results and report written all the same); 2 bad input; 1 (compare) a regression.",
    )
    p.add_argument(
        "suite",
        metavar="SUITE|compare|report|comm",
        help="suite name or file; `compare OLD_DIR NEW_DIR`; `report DIR` to rebuild a report; "
        "`comm` to time collectives",
    )
    p.add_argument("dirs", nargs="*", metavar="DIR", help="with compare: the two output directories; with report: one")
    p.add_argument("--output-dir", help="where results go (default: runs/bench/<suite>-<time>)")
    p.add_argument("--repeats", type=int, help="run every job N times (default: the suite's repeats)")
    p.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="only this entry or configuration (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="print each job's command instead of running it")
    p.add_argument("--no-report", action="store_true", help="run the jobs only; `bench report DIR` builds the report")
    p.add_argument(
        "--tolerance", type=float, default=0.10, help="compare: smallest relative change flagged (default 0.10)"
    )
    p.add_argument(
        "--gpu-results", metavar="DIR", help="report: a GPU suite's output directory, the compute of the GPU projection"
    )
    c = p.add_argument_group("`dltrain bench comm`: collective timings and the alpha-beta fit")
    c.add_argument(
        "--nproc", type=int, default=2, help="processes on this node (default 2; at most its GPUs, or its cores)"
    )
    c.add_argument(
        "--nnodes", type=int, default=1, help="number of nodes, each running this command (as `dltrain launch`)"
    )
    c.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1; node 0 writes the results")
    c.add_argument("--master", metavar="ADDR:PORT", help="node 0's address and rendezvous port (several nodes)")
    c.add_argument(
        "--ops", default="all_reduce,all_gather,reduce_scatter,broadcast", help="comma-separated collectives"
    )
    c.add_argument("--min-bytes", default="4K", help="smallest message (default 4K)")
    c.add_argument("--max-bytes", default="512M", help="largest message (default 512M)")


def cmd_bench(args) -> int:
    from dltrain.recipe import RecipeError

    if args.suite == "compare":
        from dltrain.bench.compare import run_compare

        if len(args.dirs) != 2:
            raise RecipeError("usage: dltrain bench compare OLD_DIR NEW_DIR (two `dltrain bench` output directories)")
        if not (math.isfinite(args.tolerance) and 0 <= args.tolerance < 1):
            # nan would flag nothing (every comparison with it is false), a negative value everything
            raise RecipeError(f"--tolerance {args.tolerance}: a fraction in [0, 1), e.g. 0.10 for 10%")
        return run_compare(*args.dirs, tolerance=args.tolerance)
    if args.suite == "comm":
        return cmd_comm(args)
    if args.suite == "report":
        # Rebuild summary, report and plots from the results a (possibly interrupted) run left.
        if len(args.dirs) != 1 or not (Path(args.dirs[0]) / "results.jsonl").is_file():
            raise RecipeError("usage: dltrain bench report DIR (a `dltrain bench` output directory with results.jsonl)")
        finish(Path(args.dirs[0]), gpu_results=args.gpu_results)
        print(f"dltrain bench: report in {Path(args.dirs[0]) / 'report.md'}")
        return 0
    if args.dirs:
        raise RecipeError(f"unexpected arguments {' '.join(args.dirs)}: `dltrain bench SUITE` takes one suite")
    if args.repeats is not None and args.repeats < 1:
        raise RecipeError(f"--repeats {args.repeats}: give a positive number")
    return bench(args.suite, args.output_dir, args.repeats, args.dry_run, args.only, report=not args.no_report)


def cmd_comm(args) -> int:
    """`dltrain bench comm`: time the collectives, fit alpha and busbw, write comm.json and report.md."""
    from dltrain.bench.comm import parse_size, run_comm
    from dltrain.bench.markdown_scaling import comm_section
    from dltrain.bench.plots import plot_comm
    from dltrain.bench.result import CommRun
    from dltrain.recipe import RecipeError

    if args.dirs:
        raise RecipeError(f"unexpected arguments {' '.join(args.dirs)}: `dltrain bench comm` takes options only")
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir("comm")
    if (out_dir / "comm.json").exists():
        raise RecipeError(f"{out_dir} already holds communication results: choose another --output-dir")
    check_output_dir(out_dir)
    result = run_comm(
        out_dir,
        args.nproc,
        tuple(o.strip() for o in args.ops.split(",") if o.strip()),
        parse_size(args.min_bytes),
        parse_size(args.max_bytes),
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master=args.master,
    )
    if result is None:
        print(f"dltrain bench comm: node {args.node_rank} done; node 0 writes the results")
        return 0
    measured = CommRun.model_validate(result)
    plot = plot_comm([measured], out_dir)
    lines = ["# dltrain bench comm", "", *comm_section([measured])] + (
        [f"![busbw]({plot.relative_to(out_dir)})", ""] if plot else []
    )
    (out_dir / "report.md").write_text("\n".join(lines))
    print(f"dltrain bench comm: report in {out_dir / 'report.md'}")
    return 0
