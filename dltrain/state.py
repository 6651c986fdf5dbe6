"""What a training run carries: the counters a checkpoint saves (TrainState) and everything the
loop needs, built once by dltrain.run (Loop). Typed, so a reader sees what each field holds; the
backend sits behind `strategy`, so nothing here asks which one it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from dltrain.accel import BatchPlan
    from dltrain.data import DataSplits
    from dltrain.metrics import StepClock
    from dltrain.recipe import RecipeBase
    from dltrain.strategy import Strategy
    from dltrain.tracking import RunLog
    from dltrain.workload import Workload


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps completed inside the current epoch
    nonfinite_steps: int = 0
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler
    best: float | None = None  # best value of the target metric so far
    time_to_target_s: float | None = None
    last_eval: dict = field(default_factory=dict)


@dataclass
class Loop:
    """One run's loop: what it trains, with what, where it writes, and what it measured."""

    recipe: RecipeBase
    workload: Workload
    strategy: Strategy
    plan: BatchPlan
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataSplits
    run_dir: Path
    run_id: str  # carried by every checkpoint of the run (dltrain.rundir); pruning deletes only those
    total_steps: int
    steps_per_epoch: int
    t_start: float  # perf_counter before the data was touched: time-to-target counts from here
    peak_flops: float | None = None  # per process, for MFU; None where unknown (e.g. a MIG slice)
    peak_source: str = ""
    log: RunLog | None = None  # metrics.jsonl and the trackers, opened once the start has passed every check
    # Filled while it runs
    clock: StepClock | None = None
    throughput: dict[str, float] = field(default_factory=dict)  # the clock's summary at the end of fit()
    steady: dict[str, float] = field(default_factory=dict)  # FLOPs and tokens summed over the steady log windows
    last_checkpoint: str | None = None
    pending: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)  # device flags since the last sync

    @property
    def accelerator(self) -> Accelerator:
        return self.strategy.accelerator

    @property
    def model(self) -> torch.nn.Module:
        return self.strategy.model

    @property
    def sync_every(self) -> int:
        """Steps between host reads: 1 on a CPU with one process (a read costs nothing there), 50
        on a GPU or with several processes, unless the recipe says."""
        acc = self.accelerator
        return self.recipe.train.sync_every or (1 if acc.device.type == "cpu" and acc.num_processes == 1 else 50)
