"""Run a suite: every job as a launched process group (or in this process), one Result per run.

Jobs run one after another (a benchmark shares the machine with nothing of its own), repeat by
repeat, in the order of dltrain.bench.suite.expand: the suite's entries in file order, each
entry's dltrain configurations, then its baselines, so slow phases of a shared machine fall on
both sides of a ratio. A job that fails or times out is recorded with its error and the suite goes
on. With the suite's `in_process: true`, single-process dltrain jobs run inside this process
(dltrain.bench.inprocess) instead of a launched one: no interpreter or CUDA start-up per job.

Several nodes: start `dltrain bench SUITE` on every node (e.g. under srun) with
DLTRAIN_NODE_RANK (or SLURM_NODEID) and DLTRAIN_MASTER=ADDR:PORT set; every node walks the same
job list, so the launchers meet job by job, and only node 0 runs single-node jobs and writes
results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dltrain import allocator, shipped
from dltrain.bench import inprocess
from dltrain.bench.flops import add_flops, measure_cpu_peaks, measure_entries
from dltrain.bench.joblog import baseline_summary, error_line
from dltrain.bench.measure import compute_shape
from dltrain.bench.result import Result, append_result
from dltrain.bench.suite import BASELINE_KINDS, Job, Suite, select
from dltrain.launch import LaunchError, build_command, format_command
from dltrain.recipe import RecipeError

BASELINES = shipped.folder("baselines")


def node_info() -> tuple[int, str | None]:
    rank = os.environ.get("DLTRAIN_NODE_RANK") or os.environ.get("SLURM_NODEID") or "0"
    if not (rank.isascii() and rank.isdigit()):
        raise RecipeError(f"DLTRAIN_NODE_RANK (or SLURM_NODEID) {rank!r}: this node's rank, a number from 0")
    return int(rank), os.environ.get("DLTRAIN_MASTER")


def train_args(job: Job, suite: Suite, run_dir: Path) -> list[str]:
    args = [job.entry.recipe] + (["--profile", job.entry.profile] if job.entry.profile else [])
    for s in job.sets:
        args += ["--set", s]
    return args + ["--output-dir", str(run_dir)]


def command_for(job: Job, suite: Suite, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of a job. `suite`: a Suite, or a record suite (dltrain.bench.ttt)."""
    if job.baseline_argv is not None:  # a record's reference script, with the flags its suite gives
        argv, env = [sys.executable, *job.baseline_argv], {}
    elif job.kind in BASELINE_KINDS:
        # The allocator settings dltrain applies to itself (dltrain.allocator), so that the ratio
        # to a baseline measures the training loop and not malloc.
        argv, env = baseline_command(job, suite), ({} if allocator.describe_env() else dict(allocator.ENV))
    else:
        args = train_args(job, suite, run_dir)
        node_rank, master = node_info()
        argv, env = build_command(
            nproc=job.world // job.nnodes,
            nnodes=job.nnodes,
            node_rank=node_rank,
            master=master,
            cpu=suite.device == "cpu",
            deepspeed=job.deepspeed,
            train_args=args,
        )
    if threads := omp_threads(job, suite):
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shipped.import_root()), os.environ.get("PYTHONPATH", "")) if p)
    return argv, env


def cpu_threads(job: Job, suite: Suite) -> int:
    """Processes on one host share its cores: each gets its share, so world size 2 on 2 cores is
    2 x 1 thread, not 2 x 2 threads fighting over the same cores."""
    return suite.cpu_threads or max(1, (os.cpu_count() or 1) // (job.world // job.nnodes))


def omp_threads(job: Job, suite: Suite) -> int | None:
    """A job's threads per process: on a CPU suite its share (cpu_threads); a suite without a device
    (a record suite's runs use what they find) only those it names; a GPU suite none."""
    if suite.device == "cpu":
        return cpu_threads(job, suite)
    return suite.cpu_threads if suite.device is None else None


def baseline_command(job: Job, suite: Suite) -> list[str]:
    """Baseline scripts take the same flags: --steps timed after --warmup untimed, --batch,
    --precision, --seed; they print one JSON line with train_samples_per_s. The workload names its
    scripts (Workload.baselines) and whether they also take the recipe (baseline_takes_recipe)."""
    from dltrain.workload import get_workload

    e, recipe = job.entry, job.recipe
    workload = get_workload(recipe.workload)
    if job.kind not in workload.baselines:
        raise LaunchError(f"the {recipe.workload} workload has no '{job.kind}' baseline script")
    script = BASELINES / workload.baselines[job.kind]  # an absolute path stays as it is
    argv = [
        sys.executable,
        str(script),
        "--steps",
        str(job.steps - suite.warmup_steps),
        "--warmup",
        str(suite.warmup_steps),
        "--batch",
        str(recipe.train.global_batch_size),
        "--precision",
        job.precision,
        "--seed",
        str(recipe.train.seed),
    ]
    if workload.baseline_takes_recipe:
        argv += ["--recipe", e.recipe, *(["--profile", e.profile] if e.profile else [])]
        argv += [arg for s in e.overrides for arg in ("--set", s)]
    return argv


def run_job(job: Job, suite: Suite, run_dir: Path, log: Path) -> tuple[dict | None, str | None, float, str]:
    """(summary.json of the run or None, error or None, wall seconds, command line)."""
    if inprocess.eligible(job, suite):
        return run_in_process(job, suite, run_dir, log)
    try:
        argv, env = command_for(job, suite, run_dir)
    except LaunchError as exc:
        return None, f"cannot launch: {exc}", 0.0, ""
    cmd = format_command(argv, env)
    if job.script and not Path(argv[1]).is_file():
        return None, f"baseline script {argv[1]} not found", 0.0, cmd
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        try:
            rc = subprocess.run(
                argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, timeout=suite.timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            return None, f"timed out after {suite.timeout_s} s (suite timeout_s)", time.perf_counter() - t0, cmd
    wall = time.perf_counter() - t0
    if job.script:
        summary = baseline_summary(log, job.recipe.workload) if rc == 0 else None
        return summary, None if summary else error_line(log, rc), wall, cmd
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        return None, error_line(log, rc), wall, cmd
    return json.loads(summary_path.read_text()), None, wall, cmd


def run_in_process(job: Job, suite: Suite, run_dir: Path, log: Path) -> tuple[dict | None, str | None, float, str]:
    """The same job as run_job's launched `python -m dltrain train`, inside this process."""
    args = train_args(job, suite, run_dir)
    env = {"ACCELERATE_USE_CPU": "true"} if suite.device == "cpu" else {}
    threads = omp_threads(job, suite)
    cmd = "(in process) " + format_command(["dltrain", "train", *args], env)
    t0 = time.perf_counter()
    error = inprocess.run(job.recipe, run_dir, log, env=env, threads=threads, timeout_s=suite.timeout_s)
    wall = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if error is None and not summary_path.is_file():
        error = "in process: the run wrote no summary.json"
    return (None if error else json.loads(summary_path.read_text())), error, wall, cmd


def make_result(job: Job, suite: Suite, summary: dict | None, error: str | None, meta: dict) -> Result:
    """The Result of one run of `job`: `summary` its summary.json (None when it failed), `meta` the
    harness's facts about the run (repeat, run_dir, wall_s, command ...). A record's run (mode
    `record`) also has its seed, its target even when it failed, its own training clock and steps."""
    record = job.mode == "record"
    result = Result(
        suite=suite.name,
        config=job.config,
        kind=job.kind,
        entry=job.entry.name,
        mode=job.mode,
        pair=job.pair,
        reference=job.entry.reference,
        world_size=job.world,
        nnodes=job.nnodes,
        precision=job.precision,
        deepspeed_stage=job.deepspeed,
        compile=job.compile,
        status="failed" if error else "ok",
        error=error,
        tf32=bool(getattr(job.recipe.train, "tf32", False)),
        seed=job.seed,
        target=job.recipe.target.model_dump(mode="json") if record and job.recipe.target else None,
        **meta,
    )
    if summary is None:
        return result
    tput = summary.get("throughput", {})
    figures = {
        k: tput.get(k)
        for k in (
            "step_time_ms_p50",
            "step_time_ms_p90",
            "step_time_ms_percentiles",
            "data_wait_share",
            "steady_steps",
            "eval_s",
            "checkpoint_s",
            "train_wall_s",
            "overall_samples_per_s",
            "clock_agreement",
            "tokens_per_s",
            "padded_tokens_per_s",
        )
    }
    batch = summary.get("batch")
    if record:
        figures |= {"train_s": tput.get("train_s"), "steps": summary.get("steps")}
    return result.model_copy(
        update={
            **figures,
            "workload": summary.get("workload"),
            "samples_per_s": tput.get("train_samples_per_s"),
            "run_mfu": tput.get("mfu"),
            "time_to_target_s": summary.get("time_to_target_s"),
            "target": summary.get("target") or result.target,
            "metrics": summary.get("metrics", {}),
            "batch": batch,
            "memory": summary.get("memory"),
            "environment": summary.get("environment"),
            "wandb_run_id": summary.get("wandb_run_id"),
            "shape": compute_shape(job.recipe, (batch or {}).get("micro")) if job.kind == "dltrain" else None,
        }
    )


def check_host(suite: Suite, jobs: list[Job]) -> None:
    """What this host can run, before the first job: a GPU suite needs CUDA (never a GPU suite's
    figures measured on the CPU); a CPU suite at most 4 processes per core, and threads per
    process likewise (torch.set_num_threads overflows past 2**31; far before, the host thrashes)."""
    if suite.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(f"suite {suite.name} is a GPU suite (device: gpu) but CUDA is not available here")
        return
    cores = os.cpu_count() or 1
    if suite.cpu_threads is not None and suite.cpu_threads > 4 * cores:
        raise RecipeError(
            f"suite {suite.name}: cpu_threads {suite.cpu_threads} is over 4 per core of this host ({cores} cores)"
        )
    most = max((j.world // j.nnodes for j in jobs), default=1)
    if most > 4 * cores:
        raise RecipeError(
            f"suite {suite.name}: world_sizes asks for {most} processes on one node, over 4 per core of "
            f"this host ({cores} cores): lower world_sizes or spread them over `nodes`"
        )


def _run_or_note_cut(job: Job, suite: Suite, run_dir: Path, log: Path, meta_run: dict, results: Path | None):
    """run_job; when the caller's time budget interrupts it (device_check.sh's timeout sends
    SIGINT), the cut job is recorded as such before the interrupt goes on, so the report built
    from what finished also says what was cut."""
    t0 = time.perf_counter()
    try:
        return run_job(job, suite, run_dir, log)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        if results is not None:
            append_result(
                results,
                make_result(
                    job,
                    suite,
                    None,
                    "interrupted (the time budget ran out)",
                    meta_run | {"wall_s": time.perf_counter() - t0, "command": ""},
                ),
            )
        raise


def run_suite(
    suite: Suite,
    out_dir: Path,
    *,
    repeats: int | None = None,
    dry_run: bool = False,
    only: list[str] = (),
    jobs: list[Job] | None = None,
) -> list[Result]:
    """Run the plan (`jobs`, else the suite's, kept to `only`) `repeats` times; one Result per run."""
    jobs = select(suite, only) if jobs is None else jobs
    repeats = repeats or suite.repeats
    node_rank, master = node_info()
    if dry_run:
        for job in jobs:
            try:
                where = "(in process, as) " if inprocess.eligible(job, suite) else ""
                print(
                    f"[{job.config}] {where}{format_command(*command_for(job, suite, out_dir / 'runs' / job.config))}"
                )
            except LaunchError as exc:
                print(f"[{job.config}] cannot launch here: {exc}")
        return []
    check_host(suite, jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    print(f"dltrain bench: suite {suite.name}: {len(jobs)} jobs x {repeats} repeats -> {out_dir}", flush=True)
    measured = measure_entries(suite, jobs) if node_rank == 0 else {}
    peaks = measure_cpu_peaks(suite, jobs)
    meta = {
        "suite": suite.model_dump(mode="json"),
        "cpu_peak_flops_per_s": peaks,
        "flops": measured,
        "repeats": repeats,
        "gpu_results": suite.gpu_results,
    }
    if node_rank == 0:
        (out_dir / "bench_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    if suite.comm is not None and node_rank == 0:
        from dltrain.bench.comm import run_for_suite

        run_for_suite(suite.comm, out_dir / "comm", cpu=suite.device == "cpu")
    results_run = []
    for r in range(repeats):
        for i, job in enumerate(jobs, 1):
            if job.nnodes == 1 and node_rank > 0:
                continue
            name = f"{job.config}-r{r}"
            run_dir = out_dir / "runs" / name
            print(f"[{r * len(jobs) + i}/{len(jobs) * repeats}] {name} ...", end=" ", flush=True)
            meta_run = {
                "repeat": r,
                "run_dir": str(run_dir),
                "warmup_steps": suite.warmup_steps,
                "cpu_threads": suite.cpu_threads if suite.device == "cpu" else None,
            }
            if job.nnodes > 1 and not master:
                summary, error, wall, cmd = None, "several nodes need DLTRAIN_MASTER=ADDR:PORT on every node", 0.0, ""
            else:
                summary, error, wall, cmd = _run_or_note_cut(
                    job, suite, run_dir, out_dir / "logs" / f"{name}.log", meta_run, results if node_rank == 0 else None
                )
            print(f"failed: {error}" if error else f"{wall:.0f} s", flush=True)
            result = make_result(job, suite, summary, error, meta_run | {"wall_s": wall, "command": cmd})
            # A shared machine depresses any one peak measurement: sample it again after every job
            # and keep the best; the report recomputes CPU MFU against the best of the suite.
            if peaks:
                again = measure_cpu_peaks(suite, jobs, seconds=0.5)
                peaks = meta["cpu_peak_flops_per_s"] = {k: max(v, again.get(k, 0.0)) for k, v in peaks.items()}
                if node_rank == 0:
                    (out_dir / "bench_meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if summary is not None:
                add_flops(result, measured.get(job.entry.name), peaks)
            results_run.append(result)
            if node_rank == 0:
                append_result(results, result)
    return results_run
