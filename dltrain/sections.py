"""The recipe's schema: the sections every recipe has (RecipeBase), the types and bounds they take,
and the checks across sections. Each workload's recipe subclasses RecipeBase with its own
sections (dltrain.workloads); dltrain.recipe loads, validates and writes recipes. No code here
imports a workload, so the workload interface (dltrain.workload) can name RecipeBase.

Bounds are those of the code downstream: a value the schema accepts must not crash the run. Floats
are finite, counts at most MAX_COUNT, seeds in [0, 2**32), names not paths, W&B names as W&B takes
them.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Counts (steps, epochs, sizes) end up in int64s (torch, JSON readers) and the epoch in the data
# order's generator seed (dltrain.data): 2**62 is "never" and still fits with room to add.
MAX_COUNT = 2**62
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Steps = Annotated[int, Field(ge=0, le=MAX_COUNT)]


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_if_dir(name: str) -> str:
    return _absolute(name) if os.path.isdir(os.path.expanduser(name)) else name


# A file or folder the run reads, stored absolute (from the directory the recipe was loaded in):
# the run's recipe.yaml is read again by `dltrain eval`/`export` from anywhere, and "train.csv"
# typed in one directory is another file, or none, in the next. os.path.abspath, not
# Path.resolve: a symlinked data folder keeps the name the user gave it.
LocalPath = Annotated[str, Field(min_length=1), AfterValidator(_absolute)]
# A hub id or a local folder (model.name_or_path, data.dataset): absolute when it is a folder here.
HubIdOrPath = Annotated[str, Field(min_length=1), AfterValidator(_absolute_if_dir)]


class Section(BaseModel):
    """A recipe section (`model:`, `data:`, ...): a pydantic model whose fields are the section's
    keys, with their types, defaults and meanings, which `dltrain schema` lists. A key's meaning is
    the docstring under it (one per key, as torchtitan's job_config.py). Closed: an unknown key is
    an error naming its path; floats must be finite."""

    # Closed: a misspelt key is an error, not a silently ignored value. Floats are finite: an
    # lr, weight decay or target of .inf/.nan is a typo that would otherwise surface as a
    # non-finite loss (or a target never reached) after the data has loaded.
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), allow_inf_nan=False, use_attribute_docstrings=True
    )


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    """peak learning rate"""
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.0, ge=0)
    """SGD only"""
    fused: bool | None = None
    """torch's fused optimizer step (one kernel for all parameters); default: on, except under
    DeepSpeed, which steps its own partitions"""
    no_decay_bias_norm: bool | None = None
    """no weight decay for biases and normalization-layer weights (their own parameter group, as the
    HF Trainer); default: on for adamw, off otherwise"""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("betas must each be in [0, 1)")
        return betas


class ScheduleConfig(Section):
    # none: constant. linear_warmup (dltrain's): lr rises as (step + 1) / (warmup + 1) over the
    # warm-up, then decays linearly to zero at the last optimizer step. The others are
    # transformers.get_scheduler's (dltrain.optim).
    name: Literal[
        "none",
        "linear_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
    ] = "none"
    """learning-rate schedule"""
    warmup_steps: Steps | None = None
    """optimizer steps of warm-up; default: warmup_fraction of all steps"""
    warmup_fraction: float = Field(0.0, ge=0, le=1)
    """warm-up as a share of all optimizer steps"""


class CompileConfig(Section):
    """torch.compile of the training forward and loss (backward through AOTAutograd); the first
    (compiling) steps fall in the warm-up. `train.compile: true` is short for `enabled: true`."""

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs"""
    fullgraph: bool = True
    """a graph break is an error, not a silent slow path"""
    dynamic: bool | None = False
    """False: shapes are static in the steady state (fixed batches, BERT buckets)"""

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value):
        return {"enabled": value} if isinstance(value, bool) else value


class TrainConfig(Section):
    epochs: Count | None = 1
    max_steps: Count | None = None
    """optimizer steps; overrides epochs"""
    global_batch_size: Count = 64
    micro_batch_size: Count | None = None
    """Hardware stays out of recipes: per-device batch and accumulation are derived from the world
    size. Give one of them to pin it; the three must then multiply out to global_batch_size."""
    grad_accum: Count | None = None
    clip_grad_norm: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, ge=0, lt=2**32)
    """torch takes seeds below 2**64, but the data order draws from seed * 1_000_003 + epoch
    (dltrain.data), which must fit too: [0, 2**32), the range numpy and most tools take."""
    eval_every: Steps = 0
    """optimizer steps between evaluations; 0 = each epoch"""
    log_every: Count = 50
    max_nonfinite_steps: Steps = 0
    """non-finite losses tolerated before stopping"""
    warmup_steps_excluded: Steps = 5
    """first steps left out of throughput"""
    sync_every: Count | None = None
    """Steps between host reads (non-finite check, stop on a signal): the step never waits for the
    device in between. null: by device, 1 on a CPU with one process (a read costs nothing
    there), 50 on a GPU or with several processes."""
    compile: CompileConfig = CompileConfig()
    tf32: bool = False
    """TF32 for fp32 matmuls and convolutions on Ampere and newer GPUs (torch's own default differs
    between the two); MFU of an fp32 run is taken against the TF32 peak when on, FP32 when off."""
    cpu_threads: Count | None = Field(None, le=4096)
    """torch threads per process on a CPU; default: OMP_NUM_THREADS if set, else the cores this
    process may use / processes on the node"""

    @model_validator(mode="after")
    def _a_length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("train.epochs and train.max_steps are both empty: give one (max_steps wins when both are)")
        return self


# The trackers Accelerate drives (accelerate.utils.LoggerType), each its own pip package.
TRACKERS = ("wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
WandbName = Annotated[str, Field(min_length=1, max_length=128)]


class TrackingConfig(Section):
    trackers: list[Literal[TRACKERS]] = ["wandb"]
    """Accelerate trackers to log to (each must be installed); W&B is offline unless you are logged in"""
    wandb: bool | None = None
    """shorthand kept from older recipes: false drops wandb from trackers, true adds it"""
    project: str = "dltrain"  # W&B's rules: 1-128 characters, none of / \ # ? % :
    """project name in every tracker"""
    entity: WandbName | None = None
    """W&B entity (user or team); default: your W&B default"""
    group: WandbName | None = None
    """W&B group, e.g. one per sweep"""
    run_name: WandbName | None = None
    """W&B run name; default: the run directory's name"""
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = []
    """W&B takes tags of 1-64 characters"""
    plots: bool = True

    @model_validator(mode="after")
    def _wandb_shorthand(self) -> TrackingConfig:
        # The old switch, folded into the list (`wandb` stays as given, so a resolved recipe reads back the same).
        if self.wandb is False:
            self.trackers = [t for t in self.trackers if t != "wandb"]
        elif self.wandb and "wandb" not in self.trackers:
            self.trackers = [*self.trackers, "wandb"]
        self.trackers = list(dict.fromkeys(self.trackers))  # each once
        return self

    @field_validator("project")
    @classmethod
    def _a_wandb_project(cls, project: str) -> str:
        bad = sorted(set(project) & set("/\\#?%:"))
        if not project or len(project) > 128 or bad or not project.isprintable():
            found = f" (found {' '.join(bad)})" if bad else ""
            raise ValueError(f"W&B takes a project name of 1-128 printable characters without / \\ # ? % :{found}")
        return project


class CheckpointConfig(Section):
    every_steps: Count | None = None
    every_epochs: Count | None = None
    keep_last: Count = 2
    dir: str | None = None
    """default: RUN_DIR/checkpoints; a relative path is taken inside the run directory"""
    outside_run_dir: bool = False
    """A `dir` outside the run directory (e.g. a scratch filesystem) is refused unless this is true;
    pruning there deletes only this run's checkpoints (dltrain.rundir)."""
    save_final_model: bool = True
    save_best: bool = False
    """write RUN_DIR/best_model at each evaluation whose target.metric is the best so far; a tie
    keeps the later model"""


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    config_file: str | None = Field(None, min_length=1)
    """a DeepSpeed JSON config (relative: from the working directory); its batch sizes, accumulation
    and clipping may be "auto" (the recipe's)"""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO stages 1-3"""
    offload_params: Literal["none", "cpu"] = "none"
    """ZeRO stage 3 only (DeepSpeed ignores it below)"""

    @model_validator(mode="after")
    def _offload_needs_its_stage(self) -> DeepSpeedConfig:
        # Stage 0 runs without DeepSpeed and stages 1-2 do not partition parameters: an offload
        # there would be dropped without a word.
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3 (got 0)")
        return self


class FSDPConfig(Section):
    """FSDP2 (torch's `fully_shard`): parameters, gradients and optimizer state sharded over the
    processes; dltrain applies `fully_shard` itself, on a CPU and a GPU alike (dltrain.strategy.fsdp)."""

    sharding: Literal["full_shard", "shard_grad_op"] = "full_shard"
    """full_shard: free the gathered parameters after forward, gather again for backward (least
    memory); shard_grad_op: keep them until backward ends (one all-gather per step, more memory).
    FSDP2 has no no_shard: that is DDP (distributed.strategy: ddp)."""
    auto_wrap: list[Annotated[str, Field(min_length=1, max_length=100)]] | Count = []
    """Units sharded (and gathered) one at a time, besides the root: module class names (e.g.
    [BertLayer]), or a number: every module holding at least that many parameters of its own
    subtree not already in a unit. []: the whole model is one unit."""
    reduce_dtype: Literal["fp32", "same"] = "fp32"
    """With train.precision bf16/fp16: parameters are gathered in that dtype; gradients are
    reduced in fp32 (default) or in the training dtype (half the bytes, less exact)."""
    state_dict_type: Literal["sharded", "full"] = "sharded"
    """Checkpoints: sharded = each process writes its shard (torch.distributed.checkpoint); full =
    one model.safetensors and one optimizer file gathered on rank 0."""


class DistributedConfig(Section):
    """How several processes train together. ddp: replicas, gradients all-reduced in buckets
    (the keys below are torch DistributedDataParallel's, passed through Accelerate's
    DistributedDataParallelKwargs); fsdp: sharded (the `fsdp` keys); deepspeed: the `deepspeed`
    section's ZeRO stage. null: deepspeed when deepspeed.zero_stage > 0, else ddp. One process
    uses none of them."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] | None = None
    bucket_cap_mb: float = Field(25.0, gt=0, le=1e6)
    """DDP gradient bucket size (torch's default 25 MB)"""
    gradient_as_bucket_view: bool = False
    """gradients are views into the buckets: one copy less, less memory"""
    static_graph: bool = False
    """the same parameters are used every step: DDP may skip per-step checks"""
    find_unused_parameters: bool = False
    """walk the graph each step for parameters without gradient"""
    comm_hook: Literal["none", "bf16", "fp16"] = "none"
    """Compress gradients for the all-reduce (torch's default_hooks fp16/bf16_compress_hook): half
    the bytes, rounding of the averaged gradient to 8 (bf16) or 11 (fp16) significant bits."""
    fsdp: FSDPConfig = FSDPConfig()


class TargetConfig(Section):
    """What 'trained' means for time-to-target: a metric and the value to reach."""

    metric: str = "val/accuracy"
    value: float = 0.99
    mode: Literal["max", "min"] = "max"
    stop: bool = False
    """end training at the first evaluation that reaches the target"""


class RecipeBase(Section):
    """The sections every recipe has (optim, schedule, train, tracking, checkpoint, deepspeed,
    distributed, target, profiles). A workload subclasses it with `workload: Literal["<name>"]` and
    its own sections, typically `model` and `data` (each a Section), and gives the subclass as
    `Workload.recipe`."""

    workload: str
    name: str = ""
    """names the run directory runs/<name>-<time>; default: the file's stem"""
    description: str = ""
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    deepspeed: DeepSpeedConfig | None = None
    distributed: DistributedConfig = DistributedConfig()
    target: TargetConfig | None = None
    profiles: dict[str, dict[str, Any]] = {}
    """Profiles are merged before validation; kept here only so a resolved recipe still parses."""

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, name: str) -> str:
        return check_name(name)

    @model_validator(mode="after")
    def _one_strategy(self) -> RecipeBase:
        self.distributed.strategy = resolve_strategy(self.distributed, self.deepspeed)
        return self


def resolve_strategy(dist: DistributedConfig, ds: DeepSpeedConfig | None) -> str:
    """The strategy a recipe asks for; keys of another strategy than the one in use are refused,
    since they would be dropped without a word."""
    zero = ds.zero_stage if ds is not None else 0
    strategy = dist.strategy or ("deepspeed" if zero > 0 else "ddp")
    if strategy == "deepspeed" and zero == 0:
        raise ValueError("distributed.strategy=deepspeed needs deepspeed.zero_stage 1, 2 or 3 (stage 0 is plain DDP)")
    if strategy != "deepspeed" and zero > 0:
        raise ValueError(
            f"distributed.strategy={strategy} but deepspeed.zero_stage={zero}: pick one "
            f"(set deepspeed.zero_stage=0, or distributed.strategy=deepspeed)"
        )
    if strategy != "ddp":
        defaults = DistributedConfig()
        changed = [
            k
            for k in ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph", "find_unused_parameters", "comm_hook")
            if getattr(dist, k) != getattr(defaults, k)
        ]
        if changed:
            raise ValueError(
                f"distributed.{changed[0]} is a DDP setting, and distributed.strategy is {strategy}: "
                "drop it, or use strategy ddp"
            )
    if strategy != "fsdp" and dist.fsdp != FSDPConfig():
        raise ValueError(
            f"distributed.fsdp is set but distributed.strategy is {strategy}: drop it, or use strategy fsdp"
        )
    return strategy


def check_name(name: str) -> str:
    """A run's (or suite's) name, stripped; it becomes one path component (runs/<name>-<time>) and
    the W&B run name, so it is a name, not a path. ValueError says what is wrong."""
    name = name.strip()
    if not name:
        raise ValueError("the name is empty: give one, or leave `name` out for the file's stem")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError("a name, not a path: no '/' or '\\', and not '.' or '..' (use --output-dir for where)")
    if not name.isprintable():
        raise ValueError("no control characters (newline, tab, NUL) in a name")
    if len(name.encode()) > 200:
        raise ValueError("at most 200 bytes: it becomes a file name (255 bytes at most) with a time stamp")
    return name
