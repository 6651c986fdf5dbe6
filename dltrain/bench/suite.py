"""Benchmark suites: YAML files checked by a closed schema, expanded into a list of jobs.

A suite crosses its entries (recipe, profile, overrides) with world sizes, node counts,
precisions, DeepSpeed stages and torch.compile on/off, in one or both modes:

* throughput: a fixed number of optimizer steps (`train.max_steps`), warm-up steps left out of
  the clock, evaluation only at the end (the trainer pauses its clock for it anyway);
* time_to_target: the recipe as written with `target.stop=true`, MLPerf-style.

Baselines (hand-written loops, the HF Trainer, the notebook's DataLoader pipeline) run at world
size 1 beside each precision of their entry.

Run order is file order: the entries as listed; within an entry its dltrain jobs in the order of
the axes as listed (precisions, then DeepSpeed stages, compile, nodes, world sizes, modes: list
`precisions: [bf16, fp32]` to run bf16 first), then the entry's baselines, each close to the
dltrain runs it is compared with, so a busy machine slows both sides alike. A suite cut short by a
time budget therefore holds its first entries: list the rows that matter most first (split one
recipe into several entries when its rows have different priorities).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dltrain import shipped
from dltrain.recipe import MAX_COUNT, RecipeError, _first_error, check_name, load_recipe, read_yaml

Mode = Literal["throughput", "time_to_target", "both"]
Precision = Literal["fp32", "bf16", "fp16"]
Baseline = Literal["bare", "hf_trainer", "notebook"]
BASELINE_KINDS = ("bare", "hf_trainer")  # scripts per workload: its Workload.baselines
VARIANT_KINDS = ("notebook",)  # dltrain runs with settings per workload: its Workload.bench_variants


class Closed(BaseModel):
    """A closed schema: an unknown key or a non-finite number is refused (suites and record suites)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Entry(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="short id used in run names")
    recipe: str  # a shipped recipe (`cnn_mnist`, or `recipes/cnn_mnist.yaml` as in the repository) or a path
    profile: str | None = None
    overrides: list[str] = []  # `--set` assignments, e.g. "train.global_batch_size=128"
    # Each of these, when given, replaces the suite-wide value for this entry only.
    mode: Mode | None = None
    world_sizes: list[PositiveInt] | None = None
    precisions: list[Precision] | None = None
    deepspeed_stages: list[Literal[0, 1, 2, 3] | None] | None = None
    compile: list[bool] | None = None
    throughput_steps: PositiveInt | None = Field(None, le=MAX_COUNT)
    baselines: list[Baseline] = []
    baseline_precisions: list[Precision] | None = None  # default: every precision of the entry
    # Another entry this one is a variant of (e.g. a DDP setting against DDP's defaults): the report
    # gives this entry's throughput over the reference's at the same world size, precision and mode.
    reference: str | None = None
    _recipe: Any = PrivateAttr(None)  # the entry's recipe, parsed once (entry_recipe)


class CommSection(Closed):
    """Collective timings run before the jobs (dltrain.bench.comm), one set per world size: the
    inputs of the step model that the report checks against the suite's multi-process runs."""

    world_sizes: list[Annotated[int, Field(ge=2, le=1024)]] = [2]
    ops: list[Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast"]] = [
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "broadcast",
    ]
    min_bytes: str = "4K"  # 4K, 512M, 1G or a number of bytes
    max_bytes: str = "512M"
    target_s: float = Field(0.2, gt=0, le=60, description="seconds of calls timed per size")

    @field_validator("min_bytes", "max_bytes")
    @classmethod
    def _a_size(cls, text: str) -> str:
        from dltrain.bench.comm import parse_size

        try:
            parse_size(text)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        return text


class Suite(Closed):
    name: str = ""
    description: str = ""
    device: Literal["cpu", "gpu"] = "cpu"
    mode: Mode = "throughput"
    repeats: PositiveInt = 1
    throughput_steps: PositiveInt = Field(50, le=MAX_COUNT)  # optimizer steps per throughput run
    warmup_steps: int = Field(
        5, ge=0, le=MAX_COUNT, description="first steps left out of the clock (train.warmup_steps_excluded)"
    )
    world_sizes: list[PositiveInt] = [1]
    nodes: list[PositiveInt] = [1]  # world size N on M nodes runs N/M processes per node
    max_procs_per_node: PositiveInt | None = None  # e.g. 8 GPUs: world 16 only on 2+ nodes
    precisions: list[Precision] = ["fp32"]
    deepspeed_stages: list[Literal[0, 1, 2, 3] | None] = [None]  # None: plain DDP
    compile: list[bool] = [False]
    # Weak scaling: keep the per-device batch of the recipe at world size 1 by growing the global
    # batch with the world size, so efficiency compares equal work per device.
    scale_batch: bool = True
    # W&B for the suite's dltrain runs. null: as each recipe says (`tracking.trackers`, so a recipe's
    # `trackers: []` stays off); true: every run logged to W&B (offline unless a key is configured),
    # overriding the recipes; false: none, overriding the recipes.
    wandb_runs: bool | None = None
    wandb_summary: bool = True  # one W&B run for the suite: results table and plots
    # Run world-size-1 single-node dltrain jobs inside the harness process (no interpreter or CUDA
    # start-up per job; dltrain.bench.inprocess); baselines and multi-process jobs stay launched.
    in_process: bool = False
    # CPU only: threads per process. None: the host's cores shared out among the job's processes.
    cpu_threads: PositiveInt | None = None
    # Per job; a job past it is killed and recorded as failed. At most 30 days: the in-process
    # timer (setitimer) takes no more than ~290 years, and no benchmark job runs a month.
    timeout_s: PositiveInt = Field(1800, le=30 * 86400)
    # Expected seconds of the whole suite on its device (an estimate): benchmarks/device_check.sh
    # plans a lent GPU's minutes with it and refuses a plan past its budget.
    plan_s: PositiveInt | None = None
    entries: list[Entry] = Field(min_length=1)
    comm: CommSection | None = None  # collective timings before the jobs, for the step model's check
    # A `dltrain bench gpu_single` output directory: GPU compute for the projection (else: datasheet FLOPs)
    gpu_results: str | None = None

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, name: str) -> str:
        return check_name(name) if name else name  # empty: the file's stem

    @model_validator(mode="after")
    def _steps_after_warmup(self) -> Suite:
        steps = [self.throughput_steps] + [e.throughput_steps for e in self.entries if e.throughput_steps]
        if min(steps) <= self.warmup_steps:
            raise ValueError(f"throughput_steps must exceed warmup_steps ({self.warmup_steps}): no step would be timed")
        return self

    @field_validator("entries")
    @classmethod
    def _unique_names(cls, entries: list[Entry]) -> list[Entry]:
        names = [e.name for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"entry names must be unique (repeated: {', '.join(dupes)})")
        itself = sorted(e.name for e in entries if e.reference == e.name)
        if itself:
            raise ValueError(f"entry {', '.join(itself)} names itself as its reference: name another entry")
        unknown = sorted({e.reference for e in entries if e.reference and e.reference not in names})
        if unknown:
            raise ValueError(f"reference {', '.join(unknown)}: no entry of that name")
        return entries


class Job(BaseModel):
    """One run of the plan. `overrides`: the job's axes as `--set` assignments; `sets`: every
    assignment its `dltrain train` gets (the entry's, the axes', the mode's); `recipe`: the entry's
    recipe with `sets` applied, parsed once when the plan is made. `pair` names the dltrain config
    a baseline is compared with. A record suite's jobs (mode `record`, dltrain.bench.ttt) are its
    seeds (`seed`) and references (kind `reference`: a dltrain run, or a baseline script run as
    `baseline_argv` gives it)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: str
    entry: Entry
    kind: Literal["dltrain", "bare", "hf_trainer", "notebook", "reference"]
    mode: Literal["throughput", "time_to_target", "record"]
    world: int
    nnodes: int
    precision: str
    deepspeed: int | None
    compile: bool
    steps: int | None
    overrides: list[str] = []
    pair: str | None = None
    sets: list[str] = []
    recipe: Any = Field(None, exclude=True, repr=False)
    seed: int | None = None  # a record's seed (train.seed, also in `sets`)
    baseline_argv: list[str] | None = None  # a record's baseline script and its flags, as the suite gives them

    @property
    def script(self) -> bool:
        """A baseline script's run (its printed JSON line is its summary), not `dltrain train`."""
        return self.kind in BASELINE_KINDS or self.baseline_argv is not None


def resolve_path(name_or_path: str) -> Path:
    """A shipped suite's name (`cpu_quick`) or a path to a YAML file."""
    return shipped.resolve(name_or_path, "suites")


def load_suite(name_or_path: str) -> Suite:
    path = resolve_path(name_or_path)
    if not path.is_file():
        known = ", ".join(shipped.names("suites")) or "none"
        raise RecipeError(f"{path}: suite not found (shipped suites: {known})")
    raw = read_yaml(path, what="suite")  # UTF-8, size and alias bounds as a recipe's
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_first_error(exc)}") from None
    suite.name = suite.name or path.stem
    if suite.gpu_results is not None:  # a missing or CPU directory is found now, not after every job has run
        from dltrain.bench.scaling import read_gpu_configs

        try:
            read_gpu_configs(suite.gpu_results)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {str(exc).replace('--gpu-results', 'gpu_results', 1)}") from None
    for entry in suite.entries:
        entry.recipe = str(_recipe_path(entry.recipe, path.parent))
        # Load each recipe now: a typo in a suite fails before the first job, not an hour later.
        try:
            entry_recipe(entry)
        except RecipeError as exc:
            raise RecipeError(f"{path}: entry '{entry.name}': {exc}") from None
    return suite


def entry_recipe(entry: Entry):
    """The entry's recipe with its own overrides (no job's axes), parsed on first use."""
    if entry._recipe is None:
        entry._recipe = load_recipe(entry.recipe, entry.profile, entry.overrides)
    return entry._recipe


def _recipe_path(recipe: str, suite_dir: Path) -> Path:
    """A path as given (absolute, or from the current directory), else beside the suite file, else
    a shipped recipe (dltrain.shipped.resolve), absolute so that jobs find it from any directory."""
    path = shipped.resolve(recipe)
    if not path.exists() and (suite_dir / recipe).is_file():
        path = suite_dir / recipe
    return path.resolve() if path.exists() else path


def select(suite: Suite, only: list[str] = ()) -> list[Job]:
    """The plan: expand's jobs, kept to the entries or configurations named in `only` (all if none)."""
    return [j for j in expand(suite) if not only or j.entry.name in only or j.config in only]


def expand(suite: Suite) -> list[Job]:
    """All jobs of one repeat, in the order they run: entry by entry, its dltrain configs, then
    its baselines. Each job's recipe is parsed here, with every assignment it runs with: a bad
    override fails the suite before the first job, not after the jobs before it (on a lent GPU,
    minutes)."""
    jobs = _axes(suite)
    for job in jobs:
        job.sets = train_sets(job, suite)
        try:
            job.recipe = load_recipe(job.entry.recipe, job.entry.profile, job.sets)
        except RecipeError as exc:
            raise RecipeError(f"job {job.config}: {exc}") from None
    return jobs


def train_sets(job: Job, suite: Suite) -> list[str]:
    """The `--set` assignments of a dltrain job: the entry's, the job's axes, the mode's; a variant
    baseline's (a dltrain run made into a baseline) from its workload's bench_variants."""
    sets = list(job.entry.overrides) + list(job.overrides)
    if job.mode == "throughput":
        # A fixed number of steps; evaluation only at the end (and out of the clock); no exports,
        # no per-run plots (the report plots every run's curves).
        sets += [
            f"train.max_steps={job.steps}",
            f"train.eval_every={job.steps}",
            f"train.log_every={max(1, job.steps // 10)}",
            "checkpoint.save_final_model=false",
            "checkpoint.save_best=false",
            "tracking.plots=false",
        ]
    else:
        sets += ["target.stop=true"]
    if job.kind in VARIANT_KINDS:
        sets += _variant_sets(job)
    if job.kind in ("dltrain", *VARIANT_KINDS) and suite.wandb_runs is not None:  # null: the recipe's own trackers
        sets.append(f"tracking.wandb={'true' if suite.wandb_runs else 'false'}")
    return sets


def _variant_sets(job: Job) -> list[str]:
    from dltrain.workload import get_workload

    name = entry_recipe(job.entry).workload
    sets = get_workload(name).bench_variants.get(job.kind)
    if sets is None:
        raise RecipeError(
            f"entry {job.entry.name}: the {name} workload has no '{job.kind}' baseline "
            "(its Workload.bench_variants): remove it from the entry's baselines"
        )
    return list(sets)


def _axes(suite: Suite) -> list[Job]:
    jobs: list[Job] = []
    for entry in suite.entries:
        baselines: list[Job] = []
        mode = entry.mode or suite.mode
        modes = ["throughput", "time_to_target"] if mode == "both" else [mode]
        steps = entry.throughput_steps or suite.throughput_steps
        base_batch = entry_recipe(entry).train.global_batch_size
        axes = itertools.product(
            entry.precisions or suite.precisions,
            entry.deepspeed_stages if entry.deepspeed_stages is not None else suite.deepspeed_stages,
            entry.compile if entry.compile is not None else suite.compile,
            suite.nodes,
            entry.world_sizes or suite.world_sizes,
            modes,
        )
        for precision, stage, compiled, nnodes, world, m in axes:
            if world % nnodes or world < nnodes or (suite.max_procs_per_node or world) < world // nnodes:
                continue  # e.g. world 1 on 2 nodes, or 16 processes on one 8-GPU node
            common = [f"train.precision={precision}", f"train.warmup_steps_excluded={suite.warmup_steps}"]
            if compiled:
                common.append("train.compile=true")
            if stage is not None:
                common.append(f"deepspeed.zero_stage={stage}")
            if suite.scale_batch and world > 1:
                common.append(f"train.global_batch_size={base_batch * world}")
            config = config_name(entry.name, world, nnodes, precision, stage, compiled, m)
            jobs.append(
                Job(
                    config=config,
                    entry=entry,
                    kind="dltrain",
                    mode=m,
                    world=world,
                    nnodes=nnodes,
                    precision=precision,
                    deepspeed=stage,
                    compile=compiled,
                    steps=steps if m == "throughput" else None,
                    overrides=common,
                )
            )
            wanted = entry.baseline_precisions or [precision]
            if m == "throughput" and world == 1 and stage is None and not compiled and precision in wanted:
                for kind in entry.baselines:
                    baselines.append(
                        Job(
                            config=f"{entry.name}-{kind}-{precision}",
                            entry=entry,
                            kind=kind,
                            mode=m,
                            world=1,
                            nnodes=1,
                            precision=precision,
                            deepspeed=None,
                            compile=False,
                            steps=steps,
                            overrides=list(common),
                            pair=config,
                        )
                    )
        jobs += baselines
    return jobs


def config_name(entry: str, world: int, nnodes: int, precision: str, stage, compiled: bool, mode: str) -> str:
    parts = [entry, f"w{world}"]
    if nnodes > 1:
        parts.append(f"n{nnodes}")
    parts.append(precision)
    if stage is not None:
        parts.append(f"zero{stage}")
    if compiled:
        parts.append("compile")
    parts.append("tput" if mode == "throughput" else "ttt")
    return "-".join(parts)
