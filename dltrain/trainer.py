"""The training loop. It never asks which workload it runs: workloads/ supplies model, data and loss."""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dltrain import testhooks
from dltrain.data import DataError, eval_index_batches, steps_per_epoch, train_index_batches
from dltrain.metrics import StepTimer


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite loss); the message says where and what to do."""


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


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(cfg, params, *, deepspeed: bool = False):
    """torch's fused implementations by default: one kernel over all parameters instead of a dozen
    ops per tensor, e.g. 17 ms instead of 160 ms per AdamW step for MiniLM's 22M parameters on
    one CPU thread (measured 2026-11-27), and the same arithmetic up to rounding."""
    fused = {"fused": True} if use_fused(cfg, deepspeed) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)


def use_fused(cfg, deepspeed: bool) -> bool:
    return cfg.fused if cfg.fused is not None else not deepspeed


def build_scheduler(cfg, optimizer, total_steps: int):
    """Counted in optimizer steps, so the schedule is the same whatever the world size."""
    if cfg.name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Evaluation


def reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    keys = sorted(sums)
    stacked = torch.stack([sums[k].double() for k in keys])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum")
    return dict(zip(keys, stacked.tolist()))


def add_stats(sums: dict, stats: dict[str, torch.Tensor], n_real: int) -> None:
    for key, per_example in stats.items():
        value = per_example[:n_real].detach().double().sum()
        sums[key] = sums[key] + value if key in sums else value
    count = torch.tensor(float(n_real), dtype=torch.float64, device=value.device)
    sums["count"] = sums["count"] + count if "count" in sums else count


@torch.no_grad()
def evaluate(model, split, workload, accelerator, batch: int, prefix: str) -> dict[str, float]:
    """Each example counted exactly once over all processes (see dltrain.data for the sharding)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    index_batches = list(eval_index_batches(len(split), batch=batch, rank=accelerator.process_index, world=accelerator.num_processes))
    for (_, n_real), b in zip(index_batches, split.batches(idx for idx, _ in index_batches)):
        add_stats(sums, workload.forward(model, b).stats, n_real)
    model.train()
    totals = reduce_sums(accelerator, sums)
    return {f"{prefix}/{k}": v for k, v in workload.summarize(totals).items()} | {f"{prefix}/examples": int(totals["count"])}


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class Loop:
    """What the loop needs, built once by fit()."""

    recipe: object
    workload: object
    accelerator: object
    plan: object
    model: object
    optimizer: object
    scheduler: object
    data: object
    log: object
    total_steps: int
    steps_per_epoch: int
    t_start: float
    on_step_end: object = None  # callable(loop, state) -> None: checkpoints, signals
    on_new_best: object = None  # callable(loop, state) -> None: e.g. export the best model
    timer: StepTimer | None = None
    last_checkpoint: str | None = None

    def __post_init__(self) -> None:
        # Accelerate's optimizer wrapper does work of its own only with a GradScaler (fp16) or on
        # XLA; otherwise its step() and zero_grad() call the wrapped optimizer's, after package
        # lookups on the file system (is_lomo_available, inspect.signature) that cost ~70 us per
        # step, 7% of an RNN step on a CPU. Call the wrapped optimizer directly then.
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        opt = self.optimizer
        direct = (isinstance(opt, AcceleratedOptimizer) and opt.scaler is None
                  and self.accelerator.distributed_type not in (DistributedType.XLA, DistributedType.DEEPSPEED))
        self._inner = opt.optimizer if direct else opt
        # Likewise Accelerator.backward divides the loss by the accumulation steps, a graph node
        # even when that is 1; without accumulation, a scaler or DeepSpeed it is loss.backward().
        self._plain_backward = direct and self.plan.grad_accum == 1

    def backward(self, loss: torch.Tensor) -> None:
        if self._plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> None:
        self._inner.step()

    def zero_grad(self) -> None:
        self._inner.zero_grad(set_to_none=True)


def fit(loop: Loop, state: TrainState) -> TrainState:
    r, acc, plan = loop.recipe, loop.accelerator, loop.plan
    timer = loop.timer = StepTimer(acc.device, r.train.warmup_steps_excluded, plan.global_batch)
    bar = tqdm(total=loop.total_steps, initial=state.step, disable=not acc.is_main_process, unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    window: dict = {}  # per-step statistics since the last log record
    fail_at = testhooks.fail_at_step(acc.process_index)
    loop.model.train()
    while state.step < loop.total_steps:
        batches = loop.data.train.batches(
            train_index_batches(
                len(loop.data.train), micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                rank=acc.process_index, world=plan.world, seed=r.train.seed, epoch=state.epoch,
                start_step=state.step_in_epoch,
            )
        )
        timer.start()
        while state.step_in_epoch < loop.steps_per_epoch and state.step < loop.total_steps:
            nonfinite = _train_step(loop, batches, window, timer)
            state.step += 1
            state.step_in_epoch += 1
            _handle_nonfinite(loop, state, nonfinite)
            if state.step == fail_at:
                raise RuntimeError(f"injected failure on rank {acc.process_index} at step {fail_at} (DLTRAIN_TEST_FAIL_AT_STEP)")
            timer.stop()
            bar.update(1)
            if state.step % r.train.log_every == 0 or state.step == loop.total_steps:
                record = _train_record(loop, window, timer)
                window.clear()
                loop.log.log(record, state.step)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", samples_s=f"{record.get('train/samples_per_s', 0):.0f}")
            epoch_done = state.step_in_epoch == loop.steps_per_epoch
            if _eval_due(r, state, epoch_done, loop.total_steps):
                timer.pause()
                run_eval(loop, state)
                timer.start()
            if loop.on_step_end is not None:
                timer.pause()
                loop.on_step_end(loop, state)
                timer.start()
            if state.time_to_target_s is not None and r.target is not None and r.target.stop:
                state.step = loop.total_steps  # reached the target: stop here, as time-to-target counts
        if state.step_in_epoch >= loop.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0
    bar.close()
    return state


def _train_step(loop: Loop, batches, window: dict, timer: StepTimer) -> bool:
    """One optimizer step: grad_accum micro-batches. Returns True when the loss was non-finite.

    Every statement here runs once per step, so each costs: on a 1 ms step (the RNN on a CPU) a
    few tensor ops are several percent. Per step it adds to the bare loop one float64 sum per
    statistic other than the loss, one `.item()` (the non-finite check, which must precede the
    update) and the scheduler step (unless constant), nothing else.
    """
    acc, model = loop.accelerator, loop.model
    loss_sum = None  # of the micro-batch losses: non-finite iff one of them is
    for _ in range(loop.plan.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        timer.add_data_wait(time.perf_counter() - t0)
        with acc.accumulate(model) if loop.plan.grad_accum > 1 else nullcontext():
            out = loop.workload.forward(model, batch)
            loss = out.loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            add_train_stats(window, loss, out.stats, loop.workload.batch_size_of(batch))
            loop.backward(out.loss)
            if acc.sync_gradients:
                if acc.num_processes > 1:  # every rank must take the same decision
                    loss_sum = acc.reduce(loss_sum, reduction="sum")
                if not math.isfinite(loss_sum.item()):
                    loop.zero_grad()
                    return True
                if loop.recipe.train.clip_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), loop.recipe.train.clip_grad_norm)
                loop.optimizer_step()
                if loop.recipe.schedule.name != "none":  # a constant schedule has nothing to step
                    loop.scheduler.step()
                loop.zero_grad()
    return False


def add_train_stats(window: dict, loss: torch.Tensor, stats: dict[str, torch.Tensor], n: int) -> None:
    """Per micro-batch: its mean loss (the one backpropagated, kept as is) and one float64 sum
    per other statistic; reduced only when a record is logged."""
    window.setdefault("loss", []).append(loss)
    window.setdefault("n", []).append(n)
    for key, per_example in stats.items():
        if key != "loss":
            window.setdefault(key, []).append(per_example.detach().sum(dtype=torch.float64))


def window_sums(window: dict) -> dict[str, torch.Tensor]:
    losses = torch.stack(window["loss"]).double()
    n = torch.tensor(window["n"], dtype=torch.float64, device=losses.device)
    sums = {k: torch.stack(v).sum() for k, v in window.items() if k not in ("loss", "n")}
    return sums | {"loss": (losses * n).sum(), "count": n.sum()}


def _handle_nonfinite(loop: Loop, state: TrainState, nonfinite: bool) -> None:
    if getattr(loop.optimizer, "step_was_skipped", False):
        state.skipped_steps += 1  # fp16 loss scaling found inf gradients: normal, logged
        loop.log.log({"train/skipped_step": 1, "train/skipped_steps": state.skipped_steps}, state.step)
    if not nonfinite:
        return
    state.nonfinite_steps += 1
    loop.log.log({"train/nonfinite_steps": state.nonfinite_steps}, state.step)
    if state.nonfinite_steps > loop.recipe.train.max_nonfinite_steps:
        ckpt = loop.last_checkpoint or "none"
        raise TrainingError(
            f"non-finite loss at step {state.step} ({state.nonfinite_steps} so far, train.max_nonfinite_steps="
            f"{loop.recipe.train.max_nonfinite_steps}); last good checkpoint: {ckpt}. Lower optim.lr, set "
            "train.clip_grad_norm or use bf16/fp32"
        )


def _train_record(loop: Loop, window: dict, timer: StepTimer) -> dict:
    totals = reduce_sums(loop.accelerator, window_sums(window)) if window else {"count": 0.0}
    record = {f"train/{k}": v for k, v in loop.workload.summarize(totals).items()} if window else {}
    record["train/lr"] = loop.scheduler.get_last_lr()[0]
    if timer.step_times_s:
        recent = timer.step_times_s[-loop.recipe.train.log_every :]
        record["train/samples_per_s"] = loop.plan.global_batch * len(recent) / sum(recent)
    return record


def _eval_due(recipe, state: TrainState, epoch_done: bool, total_steps: int) -> bool:
    every = recipe.train.eval_every
    if every:
        return state.step % every == 0 or state.step == total_steps
    return epoch_done or state.step == total_steps


def run_eval(loop: Loop, state: TrainState) -> dict:
    r = loop.recipe
    metrics = evaluate(loop.model, loop.data.val, loop.workload, loop.accelerator, loop.plan.micro_batch, "val")
    metrics["epoch"] = state.epoch + (state.step_in_epoch / loop.steps_per_epoch)
    if r.target is not None and r.target.metric in metrics:
        value = metrics[r.target.metric]
        sign = 1 if r.target.mode == "max" else -1
        if state.best is None or sign * value > sign * state.best:
            state.best = value
            if loop.on_new_best is not None:
                loop.on_new_best(loop, state)
        if state.time_to_target_s is None and sign * value >= sign * r.target.value:
            # MLPerf-style: from before the data was touched to the first evaluation at the target.
            state.time_to_target_s = time.perf_counter() - loop.t_start
            metrics["time_to_target_s"] = state.time_to_target_s
    state.last_eval = metrics
    loop.log.log(metrics, state.step)
    return metrics


def total_steps_for(recipe, n_train: int, global_batch: int) -> tuple[int, int]:
    per_epoch = steps_per_epoch(n_train, global_batch)
    if per_epoch == 0:  # bad input (exit 2), not a training failure
        raise DataError(
            f"train.global_batch_size={global_batch} is larger than the training set ({n_train} examples): "
            "lower the batch size or use more data"
        )
    total = recipe.train.max_steps or recipe.train.epochs * per_epoch
    return total, per_epoch

