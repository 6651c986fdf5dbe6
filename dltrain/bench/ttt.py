"""`dltrain bench ttt`: time-to-accuracy records. A record suite (a YAML file with `records:`
instead of `entries:`) is the record mode of the bench pipeline: its plan is each record's seeds and
reference; every run is a Result in results.jsonl, as a suite's; the seeds are aggregated by
dltrain.bench.report.aggregate into a RecordRow (records.json), rendered by dltrain.bench.records
into report.md.

A record config is a recipe and profile whose `target` names the held-out metric and the value to
reach (e.g. `test/accuracy` >= 0.99); the schedule is fixed (`target.stop` on a test metric is
refused by the recipe schema) and the held-out split is evaluated once, at the end. Each seed is
one `dltrain train` process with `train.seed=S`; `wall_s` is measured around that process (start
to exit: imports, data decode, compile, everything), `train_s` is the run's own training clock
(summary.json's throughput.train_s: first batch to last step, evaluation excluded). With
`in_process: true` the seeds run one after another inside the harness process instead
(dltrain.bench.inprocess, as a suite's single-process jobs): interpreter start, imports and the
CUDA context are paid once, which on a lent GPU counted in minutes is most of a seconds-long
record's wall time; `wall_s` then runs from the call to its return, and the report says so.

The reference is the same workload's original settings (a dltrain profile or overrides, one run),
or a baseline script's steady throughput over a window of steps projected to its full schedule
(the HF Trainer on the MiniLM data: a whole epoch takes some 20 minutes here), which the report
says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field, PositiveInt, ValidationError, field_validator

from dltrain import shipped
from dltrain.bench.joblog import baseline_summary, error_line
from dltrain.bench.records import RecordRow, report_lines, verdict
from dltrain.bench.report import aggregate
from dltrain.bench.result import Result, append_result
from dltrain.bench.suite import Closed
from dltrain.launch import format_command
from dltrain.recipe import RecipeError, _first_error, check_name, load_recipe, read_yaml


class Reference(Closed):
    what: str  # how the report names it, e.g. "original settings: 10 epochs, batch 64"
    profile: str | None = None  # a dltrain run of the record's recipe with this profile ...
    overrides: list[str] = []  # ... and these --set assignments
    baseline: str | None = Field(None, pattern=r"^[a-z_]+$")  # or a script under benchmarks/baselines/
    baseline_args: list[str] = []  # its flags (--steps, --warmup, --recipe, --set ...)
    full_samples: PositiveInt | None = None  # baseline: samples of its full schedule, for the projection


class Record(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: str
    profile: str | None = None
    overrides: list[str] = []
    seeds: list[int] = Field(min_length=1)
    reference: Reference | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds_in_range(cls, seeds: list[int]) -> list[int]:
        if any(not 0 <= s < 2**32 for s in seeds):  # train.seed's range
            raise ValueError(f"seeds are from 0 to 2**32-1, got {[s for s in seeds if not 0 <= s < 2**32][:3]}")
        if len(set(seeds)) != len(seeds):  # a repeated seed counts one run twice in the mean and spread
            raise ValueError(f"seeds repeat {sorted({s for s in seeds if seeds.count(s) > 1})}: give distinct seeds")
        return seeds


class RecordSuite(Closed):
    name: str = ""
    description: str = ""
    cpu_threads: PositiveInt | None = None  # CPU threads per run (OMP_NUM_THREADS); None: all cores
    in_process: bool = False  # seeds inside the harness process (see the module docstring); references stay launched
    plan_s: PositiveInt | None = None  # expected seconds of the whole suite, for benchmarks/device_check.sh's plan
    timeout_s: PositiveInt = Field(3600, le=30 * 86400)  # per run
    records: list[Record] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _a_name(cls, name: str) -> str:
        return check_name(name) if name else name

    @field_validator("records")
    @classmethod
    def _unique_names(cls, records: list[Record]) -> list[Record]:
        names = [r.name for r in records]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:  # results.jsonl and the report key on the name
            raise ValueError(f"record names must be unique (repeated: {', '.join(dupes)})")
        return records


def is_record_suite(raw: dict) -> bool:
    return isinstance(raw, dict) and "records" in raw


def load_record_suite(path: Path, raw: dict | None = None) -> RecordSuite:
    raw = read_yaml(path, "suite") if raw is None else raw
    raw.setdefault("name", path.stem)
    try:
        suite = RecordSuite.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_first_error(exc)}") from None
    for rec in suite.records:  # every recipe, with every seed's and the reference's settings, before any run
        target = load_recipe(_path(rec.recipe), rec.profile, rec.overrides).target
        if target is None:
            raise RecipeError(f"{path}: record {rec.name}: its recipe has no target (target.metric, target.value)")
        if rec.reference and rec.reference.baseline is None:
            load_recipe(_path(rec.recipe), rec.reference.profile, rec.reference.overrides)
        elif rec.reference and not (shipped.folder("baselines") / f"{rec.reference.baseline}.py").is_file():
            known = ", ".join(
                sorted(p.stem for p in shipped.folder("baselines").glob("*.py") if not p.stem.endswith("common"))
            )
            raise RecipeError(
                f"{path}: record {rec.name}: reference baseline {rec.reference.baseline!r} is not a "
                f"baseline script (known: {known})"
            )
    return suite


def _path(recipe: str) -> Path:
    """A shipped recipe (`recipes/x.yaml` as the repository writes it, or a name) or a path."""
    return shipped.resolve(recipe).absolute()


def _env(suite: RecordSuite) -> dict:
    root = str(shipped.import_root())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    if suite.cpu_threads:
        env["OMP_NUM_THREADS"] = str(suite.cpu_threads)
    return env


def _launch(argv: list[str], suite: RecordSuite, log: Path) -> tuple[int | None, float]:
    """(exit code or None on timeout, wall seconds from process start to exit)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        try:
            rc = subprocess.run(
                argv, env=_env(suite), stdout=out, stderr=subprocess.STDOUT, timeout=suite.timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.perf_counter() - t0


def train_run(
    suite: RecordSuite, recipe: str, profile: str | None, sets: list[str], run_dir: Path, log: Path, **facts
) -> Result:
    """One `dltrain train` run (a process, or a call with in_process): its Result, with both clocks
    (`wall_s` around the run, `train_s` its own), or its error. `facts`: the Result's config, entry,
    seed ... as the caller names the run."""
    sets = [*sets, "tracking.wandb=false", "checkpoint.save_final_model=false"]
    parsed = load_recipe(_path(recipe), profile, sets)
    if suite.in_process:
        from dltrain.bench import inprocess

        t0 = time.perf_counter()
        why = inprocess.run(parsed, run_dir, log, env={}, threads=suite.cpu_threads, timeout_s=suite.timeout_s)
        wall = time.perf_counter() - t0
    else:
        argv = [
            sys.executable,
            "-m",
            "dltrain",
            "train",
            str(_path(recipe)),
            *(["--profile", profile] if profile else []),
        ]
        argv += [a for s in sets for a in ("--set", s)]
        rc, wall = _launch([*argv, "--output-dir", str(run_dir)], suite, log)
        why = None if rc == 0 else f"timed out after {suite.timeout_s} s" if rc is None else error_line(log, rc)
    result = Result(
        suite=suite.name,
        kind="dltrain",
        mode="record",
        world_size=1,
        precision=parsed.train.precision,
        cpu_threads=suite.cpu_threads,
        wall_s=wall,
        in_process=suite.in_process,
        run_dir=str(run_dir),
        target=parsed.target.model_dump(mode="json") if parsed.target else None,
        **facts,
    )
    summary_path = run_dir / "summary.json"
    if why is not None or not summary_path.is_file():
        return result.model_copy(update={"status": "failed", "error": why or "no summary.json"})
    summary = json.loads(summary_path.read_text())
    result = result.model_copy(
        update={
            "workload": summary.get("workload"),
            "metrics": summary.get("metrics", {}),
            "target": summary.get("target") or result.target,
            "train_s": summary["throughput"].get("train_s"),
            "samples_per_s": summary["throughput"].get("train_samples_per_s"),
            "steps": summary["steps"],
            "time_to_target_s": summary.get("time_to_target_s"),
            "environment": summary.get("environment"),
        }
    )
    if result.target_value is None:  # a seed without its metric cannot count towards the record
        return result.model_copy(update={"status": "failed", "error": f"the run reported no {result.target['metric']}"})
    return result


def reference_run(suite: RecordSuite, rec: Record, out_dir: Path, precision: str) -> Result:
    ref = rec.reference
    name = f"{rec.name}-reference"
    facts = {"config": name, "entry": rec.name, "pair": rec.name}
    log = out_dir / "logs" / f"{name}.log"
    if ref.baseline is None:
        out = train_run(suite, rec.recipe, ref.profile, ref.overrides, out_dir / "runs" / name, log, **facts)
        return out.model_copy(update={"kind": "reference", "note": ref.what})
    script = shipped.folder("baselines") / f"{ref.baseline}.py"
    rc, wall = _launch([sys.executable, str(script), *ref.baseline_args], suite, log)
    summary = baseline_summary(log, rec.name) if rc == 0 else None
    result = Result(
        suite=suite.name,
        kind="reference",
        mode="record",
        world_size=1,
        precision=precision,
        wall_s=wall,
        cpu_threads=suite.cpu_threads,
        note=ref.what,
        command=format_command([sys.executable, str(script), *ref.baseline_args], {}),
        **facts,
    )
    if summary is None:
        return result.model_copy(
            update={"status": "failed", "error": "timed out" if rc is None else error_line(log, rc)}
        )
    rate = summary["throughput"]["train_samples_per_s"]
    projected = ref.full_samples / rate if ref.full_samples else None
    return result.model_copy(
        update={
            "train_s": projected,
            "samples_per_s": rate,
            "note": f"{ref.what}; projected: {ref.full_samples:,} samples at its measured {rate:.1f} samples/s",
        }
    )


def run_records(suite: RecordSuite, out_dir: Path, only: list[str] = ()) -> list[RecordRow]:
    """Every record's seeds, then its reference; one Result per run in results.jsonl as it ends.
    Interrupted (SIGINT: device_check.sh's time budget), it stops and still writes the table of
    what finished, each row saying it was cut."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[RecordRow] = []
    records = [r for r in suite.records if not only or r.name in only]
    total = sum(len(r.seeds) + (r.reference is not None) for r in records)
    done, interrupted = 0, False
    for rec in records:
        if interrupted:
            break
        recipe = load_recipe(_path(rec.recipe), rec.profile, rec.overrides)
        target = recipe.target
        runs: list[Result] = []
        for i, seed in enumerate(rec.seeds):
            done += 1
            print(f"[{done}/{total}] {rec.name} seed {seed} ...", end=" ", flush=True)
            try:
                run = train_run(
                    suite,
                    rec.recipe,
                    rec.profile,
                    [*rec.overrides, f"train.seed={seed}"],
                    out_dir / "runs" / f"{rec.name}-s{seed}",
                    out_dir / "logs" / f"{rec.name}-s{seed}.log",
                    config=rec.name,
                    entry=rec.name,
                    seed=seed,
                    repeat=i,
                )
            except KeyboardInterrupt:
                print("interrupted: the table holds the runs that finished", flush=True)
                interrupted = True
                break
            runs.append(run)
            append_result(out_dir / "results.jsonl", run)
            print(
                f"{target.metric} {run.target_value:.4g}, train {run.train_s:.1f} s, wall {run.wall_s:.1f} s"
                if run.ok
                else f"failed: {run.error}",
                flush=True,
            )
        if not runs:
            break
        ref = None
        if rec.reference is not None and not interrupted:
            done += 1
            print(f"[{done}/{total}] {rec.name} reference ...", end=" ", flush=True)
            ref = reference_run(suite, rec, out_dir, recipe.train.precision)
            append_result(out_dir / "results.jsonl", ref)
            print(f"train {ref.train_s:.1f} s" if ref.ok and ref.train_s else f"failed: {ref.error}", flush=True)
        row = RecordRow(
            name=rec.name,
            recipe=rec.recipe,
            profile=rec.profile,
            overrides=rec.overrides,
            seeds=rec.seeds[: len(runs)],
            metric_name=target.metric,
            target=target.value,
            mode=target.mode,
            config=aggregate(runs)[rec.name],
            runs=runs,
            reference=ref if ref and ref.ok else None,
            reference_failed=bool(ref and not ref.ok),
            interrupted=interrupted,
        )
        rows.append(row.model_copy(update={"met": verdict(row)}))
    (out_dir / "records.json").write_text(json.dumps([r.model_dump(mode="json") for r in rows], indent=1) + "\n")
    (out_dir / "report.md").write_text("\n".join(report_lines(suite, rows, interrupted)) + "\n")
    if interrupted:
        raise RecordsInterrupted(rows)
    return rows


class RecordsInterrupted(Exception):
    """The suite was stopped (SIGINT) after writing the table of what finished: `rows`."""

    def __init__(self, rows: list[RecordRow]):
        super().__init__("interrupted")
        self.rows = rows
