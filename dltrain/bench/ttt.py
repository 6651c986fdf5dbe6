"""`dltrain bench ttt`: time-to-accuracy records. A record suite (a YAML file with `records:`
instead of `entries:`) is the record mode of the bench pipeline: its plan is each record's seeds and
reference as Jobs (mode `record`, record_jobs); they run through dltrain.bench.runner.run_job as a
suite's jobs do (the same command, environment, log and timeout handling), each a Result in
results.jsonl; the seeds are aggregated by dltrain.bench.report.aggregate into a RecordRow
(records.json), rendered by dltrain.bench.records into report.md.

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
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator

from dltrain import shipped
from dltrain.bench.records import RecordRow, report_lines, verdict
from dltrain.bench.report import aggregate
from dltrain.bench.result import Result, append_result
from dltrain.bench.suite import Closed, Entry, Job
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
    # cpu: every run on the CPU (ACCELERATE_USE_CPU, as a CPU suite's); gpu: CUDA; None: what each run finds
    device: Literal["cpu", "gpu"] | None = None
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


# Every record run's: no W&B run, no exported model (a record is timed, not kept).
RUN_SETS = ["tracking.wandb=false", "checkpoint.save_final_model=false"]


def record_jobs(rec: Record) -> list[Job]:
    """A record's plan: one job per seed, then its reference's, each with its recipe parsed here.
    They run as a suite's jobs do (dltrain.bench.runner.run_job: the same command, environment, log
    and timeout); a reference that is a dltrain run stays a launched process with in_process."""
    recipe = str(_path(rec.recipe))
    entry = Entry(name=rec.name, recipe=recipe, profile=rec.profile, overrides=rec.overrides)
    jobs = [_job(rec.name, entry, [*rec.overrides, f"train.seed={seed}"], seed=seed) for seed in rec.seeds]
    ref = rec.reference
    if ref is not None and ref.baseline is None:
        ref_entry = Entry(name=rec.name, recipe=recipe, profile=ref.profile, overrides=ref.overrides)
        jobs.append(_job(f"{rec.name}-reference", ref_entry, list(ref.overrides), kind="reference", pair=rec.name))
    elif ref is not None:  # the script as the suite gives it; precision and workload are the record's
        script = shipped.folder("baselines") / f"{ref.baseline}.py"
        job = _job(f"{rec.name}-reference", entry, list(rec.overrides), kind="reference", pair=rec.name)
        jobs.append(job.model_copy(update={"baseline_argv": [str(script), *ref.baseline_args]}))
    return jobs


def _job(config: str, entry: Entry, sets: list[str], kind: str = "dltrain", **fields) -> Job:
    sets = [*sets, *RUN_SETS]
    recipe = load_recipe(entry.recipe, entry.profile, sets)
    return Job(
        config=config,
        entry=entry,
        kind=kind,
        mode="record",
        world=1,
        nnodes=1,
        precision=recipe.train.precision,
        deepspeed=None,
        compile=recipe.train.compile.enabled,
        steps=None,
        sets=sets,
        recipe=recipe,
        **fields,
    )


def run_record_job(job: Job, suite: RecordSuite, out_dir: Path, name: str, repeat: int = 0) -> Result:
    """One record job through the suite pipeline's runner: its Result, with both clocks (`wall_s`
    around the run, `train_s` its own), or its error. A dltrain run without its target metric
    cannot count towards the record: it is failed."""
    from dltrain.bench import inprocess, runner

    run_dir = out_dir / "runs" / name
    summary, error, wall, cmd = runner.run_job(job, suite, run_dir, out_dir / "logs" / f"{name}.log")
    meta = {
        "repeat": repeat,
        "run_dir": str(run_dir),
        "cpu_threads": suite.cpu_threads,
        "in_process": inprocess.eligible(job, suite),
        "wall_s": wall,
        "command": cmd,
    }
    result = runner.make_result(job, suite, summary, error, meta)
    if result.ok and not job.script and result.target_value is None:
        return result.model_copy(update={"status": "failed", "error": f"the run reported no {result.target['metric']}"})
    return result


def reference_result(result: Result, ref: Reference) -> Result:
    """A reference's Result as the report names it; a baseline script's steady throughput projected
    to its full schedule (`full_samples`) is its train_s."""
    result = result.model_copy(update={"note": ref.what})
    if ref.baseline is None or not result.ok or not (ref.full_samples and result.samples_per_s):
        return result
    rate = result.samples_per_s
    return result.model_copy(
        update={
            "train_s": ref.full_samples / rate,
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
    plan = {rec.name: record_jobs(rec) for rec in records}
    total = sum(map(len, plan.values()))
    done, interrupted = 0, False
    for rec in records:
        if interrupted:
            break
        seeds = [j for j in plan[rec.name] if j.kind != "reference"]
        ref_job = next((j for j in plan[rec.name] if j.kind == "reference"), None)
        target = seeds[0].recipe.target
        runs: list[Result] = []
        for i, job in enumerate(seeds):
            done += 1
            print(f"[{done}/{total}] {rec.name} seed {job.seed} ...", end=" ", flush=True)
            try:
                run = run_record_job(job, suite, out_dir, f"{rec.name}-s{job.seed}", repeat=i)
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
        if ref_job is not None and not interrupted:
            done += 1
            print(f"[{done}/{total}] {rec.name} reference ...", end=" ", flush=True)
            ref = reference_result(run_record_job(ref_job, suite, out_dir, ref_job.config), rec.reference)
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
