"""Run a suite: every job as its own launched process group, one JSON record per run.

Jobs run one after another (a benchmark shares the machine with nothing of its own), repeat by
repeat, each dltrain configuration followed by its baselines, so slow phases of a shared machine
fall on both sides of a ratio. A job that fails or times out is recorded with its error and the
suite goes on.

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

from dltrain import allocator
from dltrain.bench.measure import cpu_matmul_peak, gpu_peak, measure_workload
from dltrain.bench.suite import Job, Suite, expand
from dltrain.launch import LaunchError, build_command, format_command
from dltrain.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent.parent
BASELINES = REPO / "benchmarks" / "baselines"
BASELINE_SCRIPTS = {"bare": "{workload}_bare.py", "hf_trainer": "{workload}_hf_trainer.py"}


def node_info() -> tuple[int, str | None]:
    rank = os.environ.get("DLTRAIN_NODE_RANK") or os.environ.get("SLURM_NODEID") or "0"
    return int(rank), os.environ.get("DLTRAIN_MASTER")


def train_args(job: Job, suite: Suite, run_dir: Path) -> list[str]:
    args = [job.entry.recipe]
    if job.entry.profile:
        args += ["--profile", job.entry.profile]
    sets = list(job.entry.overrides) + list(job.overrides)
    if job.mode == "throughput":
        # A fixed number of steps; evaluation only at the end (and out of the clock); no exports.
        sets += [f"train.max_steps={job.steps}", f"train.eval_every={job.steps}", f"train.log_every={max(1, job.steps // 10)}",
                 "checkpoint.save_final_model=false", "checkpoint.save_best=false"]
    else:
        sets += ["target.stop=true"]
    if job.kind == "notebook":
        sets.append("data.loader=torch")  # the original notebook's torchvision DataLoader pipeline
    if suite.wandb_runs and job.kind in ("dltrain", "notebook"):
        sets.append("tracking.wandb=true")
    for s in sets:
        args += ["--set", s]
    return args + ["--output-dir", str(run_dir)]


def command_for(job: Job, suite: Suite, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    if job.kind in BASELINE_SCRIPTS:
        # The allocator settings dltrain applies to itself (dltrain.allocator), so that the ratio
        # to a baseline measures the training loop and not malloc.
        argv, env = baseline_command(job, suite), ({} if allocator.describe_env() else dict(allocator.ENV))
    else:
        args = train_args(job, suite, run_dir)
        node_rank, master = node_info()
        argv, env = build_command(nproc=job.world // job.nnodes, nnodes=job.nnodes, node_rank=node_rank,
                                  master=master, cpu=suite.device == "cpu", deepspeed=job.deepspeed, train_args=args)
    if suite.device == "cpu":
        # Processes on one host share its cores: give each its share, so world size 2 on 2 cores
        # is 2 x 1 thread, not 2 x 2 threads fighting over the same cores.
        env["OMP_NUM_THREADS"] = str(suite.cpu_threads or max(1, (os.cpu_count() or 1) // (job.world // job.nnodes)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return argv, env


def baseline_command(job: Job, suite: Suite) -> list[str]:
    """Baseline scripts take cnn_bare.py's flags: --steps timed after --warmup untimed, --batch,
    --precision, --seed; they print one JSON line with train_samples_per_s. Those for workloads
    other than the CNN (whose script builds the default MNIST recipe) also take the recipe."""
    e = job.entry
    recipe = load_recipe(e.recipe, e.profile, [*e.overrides, *job.overrides])
    script = BASELINES / BASELINE_SCRIPTS[job.kind].format(workload=recipe.workload)
    argv = [sys.executable, str(script), "--steps", str(job.steps - suite.warmup_steps), "--warmup", str(suite.warmup_steps),
            "--batch", str(recipe.train.global_batch_size), "--precision", job.precision, "--seed", str(recipe.train.seed)]
    if recipe.workload != "cnn":
        argv += ["--recipe", e.recipe, *(["--profile", e.profile] if e.profile else [])]
        argv += [arg for s in e.overrides for arg in ("--set", s)]
    return argv


def _baseline_summary(log: Path, workload: str) -> dict | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    for line in reversed(lines):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_samples_per_s" in out:
            keys = ("train_samples_per_s", "step_time_ms_p50", "step_time_ms_p90")
            return {"workload": workload, "throughput": {k: out[k] for k in keys if k in out}, "baseline": out}
    return None


def _error_line(log: Path, rc: int) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    ours = [ln for ln in lines if ln.startswith("dltrain:") and ("error" in ln or "stopped" in ln)]
    python = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    last = (ours or python or lines or ["no output"])[-1]
    return f"exit code {rc}: {last[:300]}"


def run_job(job: Job, suite: Suite, run_dir: Path, log: Path) -> tuple[dict | None, str | None, float, str]:
    """(summary.json of the run or None, error or None, wall seconds, command line)."""
    try:
        argv, env = command_for(job, suite, run_dir)
    except LaunchError as exc:
        return None, f"cannot launch: {exc}", 0.0, ""
    cmd = format_command(argv, env)
    if job.kind in BASELINE_SCRIPTS and not Path(argv[1]).is_file():
        return None, f"baseline script {argv[1]} not found", 0.0, cmd
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        try:
            rc = subprocess.run(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                timeout=suite.timeout_s, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            return None, f"timed out after {suite.timeout_s} s (suite timeout_s)", time.perf_counter() - t0, cmd
    wall = time.perf_counter() - t0
    if job.kind in BASELINE_SCRIPTS:
        summary = _baseline_summary(log, load_recipe(job.entry.recipe, job.entry.profile, job.entry.overrides).workload) if rc == 0 else None
        return summary, None if summary else _error_line(log, rc), wall, cmd
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        return None, _error_line(log, rc), wall, cmd
    return json.loads(summary_path.read_text()), None, wall, cmd


def _mean_tokens(run_dir: Path, warmup: int) -> tuple[float | None, float | None]:
    """Real and padded tokens per example over the logged training windows after warm-up, from
    the per-example statistics a text workload reports (BERT: tokens, padded_tokens)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "train/tokens_per_example" in r]
    steady = [r for r in recs if r["step"] > warmup] or recs
    if not steady:
        return None, None
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    return mean("train/tokens_per_example"), mean("train/padded_tokens_per_example")


def make_record(job: Job, suite: Suite, summary: dict | None, error: str | None, meta: dict) -> dict:
    rec = {
        "suite": suite.name, "config": job.config, "kind": job.kind, "entry": job.entry.name, "mode": job.mode,
        "pair": job.pair, "world_size": job.world, "nnodes": job.nnodes, "precision": job.precision,
        "deepspeed_stage": job.deepspeed, "compile": job.compile, "status": "failed" if error else "ok", "error": error,
        **meta,
    }
    if summary is None:
        return rec
    tput = summary.get("throughput", {})
    rec |= {
        "workload": summary.get("workload"),
        "samples_per_s": tput.get("train_samples_per_s"),
        "step_time_ms_p50": tput.get("step_time_ms_p50"),
        "step_time_ms_p90": tput.get("step_time_ms_p90"),
        "data_wait_share": tput.get("data_wait_share"),
        "steady_steps": tput.get("steady_steps"),
        "time_to_target_s": summary.get("time_to_target_s"),
        "target": summary.get("target"),
        "metrics": summary.get("metrics", {}),
        "batch": summary.get("batch"),
        "memory": summary.get("memory"),
        "environment": summary.get("environment"),
        "wandb_run_id": summary.get("wandb_run_id"),
    }
    return rec


def add_flops(rec: dict, measured: dict | None, cpu_peaks: dict[str, float]) -> None:
    """Tokens/s, achieved FLOP/s and MFU from the run's throughput and the harness's counts."""
    run_dir = Path(rec["run_dir"])
    real, padded = _mean_tokens(run_dir, rec.get("warmup_steps", 0))
    sps = rec.get("samples_per_s")
    if sps and real is not None:
        rec["tokens_per_s"], rec["padded_tokens_per_s"] = sps * real, sps * padded
    if not measured or not sps:
        return
    rec["flops"] = measured
    if not 0.5 <= measured["flops_measured_over_analytic"] <= 2:
        # The counter misses ops without a FLOP formula (e.g. the fused LSTM kernels): trust the
        # analytic count then, and say so.
        rec["flops_source"] = "analytic (FlopCounterMode saw {:.0%} of it)".format(measured["flops_measured_over_analytic"])
        rec["achieved_flops_per_s"] = measured["flops_per_sample_analytic"] * sps
    elif "flops_per_padded_token_measured" in measured:
        if not rec.get("padded_tokens_per_s"):
            return  # text without token counts (the baseline scripts): FLOPs per sample unknown
        rec["achieved_flops_per_s"] = measured["flops_per_padded_token_measured"] * rec["padded_tokens_per_s"]
    else:
        rec["achieved_flops_per_s"] = measured["flops_per_sample_measured"] * sps
    env = rec.get("environment") or {}
    if env.get("device") == "cuda":
        per_device = gpu_peak(env.get("gpu", ""), rec["precision"])
        if per_device is None:
            return
        rec["peak_flops_per_s"], rec["peak_source"] = per_device * rec["world_size"], f"datasheet {env.get('gpu')} x {rec['world_size']}"
    elif rec["precision"] in cpu_peaks:
        threads = rec.get("cpu_threads")
        procs = rec["world_size"] // rec["nnodes"] if threads else 1
        where = f"{threads} thread(s) x {procs} process(es)" if threads else "all cores of this host"
        rec["peak_procs"] = procs
        rec["peak_flops_per_s"], rec["peak_source"] = cpu_peaks[rec["precision"]] * procs, f"measured (CPU matmul, {where})"
    else:
        return
    rec["mfu"] = rec["achieved_flops_per_s"] / rec["peak_flops_per_s"]


def measure_entries(suite: Suite, jobs: list[Job]) -> dict[str, dict]:
    out = {}
    for entry in suite.entries:
        if not any(j.entry is entry for j in jobs):
            continue
        recipe = load_recipe(entry.recipe, entry.profile, entry.overrides)
        micro = recipe.train.micro_batch_size or recipe.train.global_batch_size // (recipe.train.grad_accum or 1)
        try:
            out[entry.name] = measure_workload(recipe, micro)
        except Exception as exc:  # a workload whose data is missing fails its jobs, not the harness
            print(f"dltrain bench: FLOP count for '{entry.name}' failed: {exc}", file=sys.stderr)
    return out


def measure_cpu_peaks(suite: Suite, jobs: list[Job], seconds: float = 1.5) -> dict[str, float]:
    if suite.device != "cpu":
        return {}
    import torch

    # With cpu_threads, each process has that many threads: the peak of one such process, times
    # the processes of a job. Without, the job's processes share all cores: the host's peak.
    before = torch.get_num_threads()
    torch.set_num_threads(suite.cpu_threads or os.cpu_count() or 1)
    try:
        return {p: cpu_matmul_peak(p, seconds=seconds) for p in sorted({j.precision for j in jobs} & {"fp32", "bf16"})}
    finally:
        torch.set_num_threads(before)


def run_suite(suite: Suite, out_dir: Path, *, repeats: int | None = None, dry_run: bool = False, only: list[str] = ()) -> list[dict]:
    jobs = [j for j in expand(suite) if not only or j.entry.name in only or j.config in only]
    repeats = repeats or suite.repeats
    node_rank, master = node_info()
    if dry_run:
        for job in jobs:
            try:
                print(f"[{job.config}] {format_command(*command_for(job, suite, out_dir / 'runs' / job.config))}")
            except LaunchError as exc:
                print(f"[{job.config}] cannot launch here: {exc}")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    print(f"dltrain bench: suite {suite.name}: {len(jobs)} jobs x {repeats} repeats -> {out_dir}", flush=True)
    measured = measure_entries(suite, jobs) if node_rank == 0 else {}
    peaks = measure_cpu_peaks(suite, jobs)
    meta = {"suite": suite.model_dump(mode="json"), "cpu_peak_flops_per_s": peaks, "flops": measured, "repeats": repeats}
    if node_rank == 0:
        (out_dir / "bench_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    records = []
    for r in range(repeats):
        for i, job in enumerate(jobs, 1):
            if job.nnodes == 1 and node_rank > 0:
                continue
            name = f"{job.config}-r{r}"
            run_dir = out_dir / "runs" / name
            print(f"[{r * len(jobs) + i}/{len(jobs) * repeats}] {name} ...", end=" ", flush=True)
            if job.nnodes > 1 and not master:
                summary, error, wall, cmd = None, "several nodes need DLTRAIN_MASTER=ADDR:PORT on every node", 0.0, ""
            else:
                summary, error, wall, cmd = run_job(job, suite, run_dir, out_dir / "logs" / f"{name}.log")
            print(f"failed: {error}" if error else f"{wall:.0f} s", flush=True)
            rec = make_record(job, suite, summary, error, {"repeat": r, "wall_s": wall, "run_dir": str(run_dir),
                                                           "command": cmd, "warmup_steps": suite.warmup_steps,
                                                           "cpu_threads": suite.cpu_threads if suite.device == "cpu" else None})
            # A shared machine depresses any one peak measurement: sample it again after every job
            # and keep the best; the report recomputes CPU MFU against the best of the suite.
            if peaks:
                again = measure_cpu_peaks(suite, jobs, seconds=0.5)
                peaks = meta["cpu_peak_flops_per_s"] = {k: max(v, again.get(k, 0.0)) for k, v in peaks.items()}
                if node_rank == 0:
                    (out_dir / "bench_meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if summary is not None:
                add_flops(rec, measured.get(job.entry.name), peaks)
            records.append(rec)
            if node_rank == 0:
                with results.open("a") as f:
                    f.write(json.dumps(rec, default=str) + "\n")
    return records
