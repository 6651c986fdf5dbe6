"""The training loop. It never asks which workload it runs: workloads/ supplies model, data and loss."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dltrain import checkpoint, export, rundir, signals, testhooks
from dltrain.data import DataError, eval_index_batches, steps_per_epoch, train_index_batches
from dltrain.errors import Preempted, RecipeError, TrainingError
from dltrain.metrics import StepClock, add_train_stats, throughput_record, window_sums
from dltrain.progress import print_eval, progress_bar
from dltrain.state import Loop, TrainState

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
    index_batches = list(
        eval_index_batches(
            len(split),
            batch=batch,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            device=accelerator.device,
        )
    )
    for (_, n_real), b in zip(index_batches, split.batches(idx for idx, _ in index_batches)):
        add_stats(sums, workload.forward(model, b).stats, n_real)
    model.train()
    totals = reduce_sums(accelerator, sums)
    return {f"{prefix}/{k}": v for k, v in workload.summarize(totals).items()} | {
        f"{prefix}/examples": int(totals["count"])
    }


# ----------------------------------------------------------------------------------------------
# Training


def fit(loop: Loop, state: TrainState) -> TrainState:
    """The training loop: each step, then its end in the order things happen: host-side sync
    point, log record, evaluation, checkpoint, preemption. One clock (dltrain.metrics.StepClock)
    covers all of it except evaluation and checkpoint writes, which it times apart."""
    r, acc, plan = loop.recipe, loop.accelerator, loop.plan
    clock = loop.clock = StepClock(acc.device, r.train.warmup_steps_excluded, plan.global_batch, start_step=state.step)
    bar = progress_bar(loop.total_steps, state.step, acc.is_main_process)  # plain lines when not on a terminal
    window: dict = {}  # per-step statistics since the last log record, as device tensors
    testhooks.arm()  # the fault-injection variables, read once here rather than every step
    rank = acc.process_index
    fail_at = testhooks.fail_at_step(rank)
    nan_at = testhooks.nonfinite_at_step()
    sync_every = loop.sync_every
    alone = plan.world == 1  # equal to acc.num_processes (dltrain.accel.check_world), without its lookups
    debug = sync_debug_mode(acc.device)  # on a GPU, torch warns or raises at a host read inside the step
    loop.model.train()
    reached = False  # the target, when target.stop ends training there
    while state.step < loop.total_steps and not reached:
        batches = loop.data.train.batches(
            train_index_batches(
                len(loop.data.train),
                micro_batch=plan.micro_batch,
                grad_accum=plan.grad_accum,
                rank=acc.process_index,
                world=plan.world,
                seed=r.train.seed,
                epoch=state.epoch,
                start_step=state.step_in_epoch,
                device=acc.device,
                # a split that groups by length (BERT's data.order: length_grouped) says by what
                lengths=getattr(loop.data.train, "order_lengths", None),
                group=getattr(loop.data.train, "group", 0),
            )
        )
        while state.step_in_epoch < loop.steps_per_epoch and state.step < loop.total_steps and not reached:
            if debug:
                torch.cuda.set_sync_debug_mode(debug)
            _train_step(loop, batches, window, state, poison=state.step + 1 == nan_at)
            if debug:  # the step's end holds the sync points: host reads there are by design
                torch.cuda.set_sync_debug_mode(0)
            state.step += 1
            state.step_in_epoch += 1
            clock.step_done(state.step)
            bar.update(1)
            if state.step == fail_at:
                raise RuntimeError(f"injected failure on rank {rank} at step {fail_at} (DLTRAIN_TEST_FAIL_AT_STEP)")
            testhooks.at_step_end(rank, state.step)
            # The step's end. Nothing below reads from the device except at a sync point.
            last = state.step == loop.total_steps
            log_due = state.step % r.train.log_every == 0 or last
            eval_due = _eval_due(r, state, state.step_in_epoch == loop.steps_per_epoch, loop.total_steps)
            save_due = _save_due(r.checkpoint, state, loop.steps_per_epoch)
            alone_stopping = alone and signals.received() is not None  # no one to agree with
            stop = False
            if state.step % sync_every == 0 or last or eval_due or save_due or alone_stopping:
                stop = _sync(loop, state)
            if log_due:
                _log_train(loop, state, window, bar)
            if eval_due:
                with clock.excluded("eval_s"):
                    run_eval(loop, state)
            if save_due or stop:
                with clock.excluded("checkpoint_s"):
                    path = checkpoint.save(loop, state)
            if stop:
                _preempt(loop, state, path)
            # Reached the target: stop here, as time-to-target counts (state.step stays the steps taken).
            reached = state.time_to_target_s is not None and r.target is not None and r.target.stop
        if state.step_in_epoch >= loop.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0
    bar.close()
    loop.throughput = clock.summary(state.step)  # before the test evaluation and exports
    return state


def sync_debug_mode(device) -> str | None:
    """DLTRAIN_SYNC_DEBUG=warn (or 1) | error: what torch.cuda.set_sync_debug_mode is given inside
    each training step of a CUDA run (None: off, and always off elsewhere)."""
    value = os.environ.get("DLTRAIN_SYNC_DEBUG", "")
    modes = {"": None, "0": None, "default": None, "1": "warn", "warn": "warn", "error": "error"}
    if value.lower() not in modes:
        raise RecipeError(f"DLTRAIN_SYNC_DEBUG={value[:40]}: not a mode: use warn (or 1) or error, or unset it")
    return modes[value.lower()] if device.type == "cuda" else None


def _train_step(loop: Loop, batches, window: dict, state: TrainState, poison: bool = False) -> None:
    """One optimizer step: grad_accum micro-batches, then the backend's step, which waits for the
    device nowhere it can avoid it (dltrain.strategy). Every statement runs once per step, so each
    costs: on a 1 ms step (the RNN on a CPU) a few tensor ops are several percent."""
    strategy, plan = loop.strategy, loop.plan
    acc, model = strategy.accelerator, strategy.model  # Loop's properties, without their calls
    accumulating = plan.grad_accum > 1  # else gradients sync at every micro-batch: sync_gradients stays True
    loss_sum = None  # of the micro-batch losses: non-finite iff one of them is
    for _ in range(plan.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        loop.clock.add_data_wait(time.perf_counter() - t0)
        with acc.accumulate(model) if accumulating else _NO_CONTEXT:
            out = loop.workload.forward(model, batch)
            if poison:  # a test hook (dltrain.testhooks): a NaN loss and NaN gradients
                out = type(out)(out.loss * float("nan"), out.stats)
            loss = out.loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            add_train_stats(window, loss, out.stats, loop.workload.batch_size_of(batch))
            strategy.backward(out.loss)
            if not accumulating or acc.sync_gradients:
                if plan.world > 1:  # every rank must take the same decision
                    loss_sum = acc.reduce(loss_sum, reduction="sum")
                _optimizer_step(loop, loss_sum, state)


_NO_CONTEXT = nullcontext()  # reusable: entered once per micro-batch when not accumulating


def _optimizer_step(loop: Loop, loss_sum: torch.Tensor, state: TrainState) -> None:
    step = state.step + 1  # the step being taken
    loop.pending += [(kind, step, flag) for kind, flag in loop.strategy.step(loss_sum)]
    if loop.recipe.schedule.name != "none":  # a constant schedule has nothing to step
        loop.scheduler.step()
    loop.strategy.zero_grad()


def _sync(loop: Loop, state: TrainState) -> bool:
    """A sync point: the one host read between them. Learns which steps since the last sync had a
    non-finite loss (not applied) or an fp16 skip, and whether any rank was asked to stop."""
    pending, loop.pending = loop.pending, []
    several = loop.plan.world > 1
    if len(pending) == 1 and not several:  # one step's one flag (a CPU syncs every step): read it alone
        value = pending[0][2].tolist()  # no operator dispatched, unlike .item()
        values = value if isinstance(value, list) else [value]
    else:
        flags = [flag.reshape(1) for _, _, flag in pending]
        acc = loop.accelerator
        if several:  # ranks agree on stopping here, not with a collective every step
            asked = 1.0 if signals.received() else 0.0
            flags.append(torch.full((1,), asked, device=acc.device))
        vector = torch.cat(flags) if flags else None
        if several:
            vector = acc.reduce(vector, reduction="sum")
        values = vector.tolist() if vector is not None else []
    for (kind, step, _), value in zip(pending, values):
        if value > 0 and kind == "skipped":
            state.skipped_steps += 1  # fp16 loss scaling found inf gradients: normal, logged
            loop.log.log({"train/skipped_step": 1, "train/skipped_steps": state.skipped_steps}, step)
        elif value > 0:
            _count_nonfinite(loop, state, step)
    return values[-1] > 0 if several else signals.received() is not None


def _count_nonfinite(loop: Loop, state: TrainState, step: int) -> None:
    state.nonfinite_steps += 1
    loop.log.log({"train/nonfinite_steps": state.nonfinite_steps}, step)
    if state.nonfinite_steps > loop.recipe.train.max_nonfinite_steps:
        ckpt = loop.last_checkpoint or "none"
        raise TrainingError(
            f"non-finite loss at step {step} ({state.nonfinite_steps} so far, train.max_nonfinite_steps="
            f"{loop.recipe.train.max_nonfinite_steps}); last good checkpoint: {ckpt}. Lower optim.lr, set "
            "train.clip_grad_norm or use bf16/fp32"
        )


def _preempt(loop: Loop, state: TrainState, path: Path) -> None:
    acc = loop.accelerator
    why = signals.received() or "a signal on another rank"
    if acc.is_main_process:
        rundir.write_preempted(loop.run_dir, state.step, path, why)
    acc.wait_for_everyone()
    acc.end_training()  # a clean shutdown of the process group and trackers before exiting
    raise Preempted(
        f"stopped by {why} at step {state.step}; checkpoint {path}; continue with "
        f"`--resume auto --output-dir {loop.run_dir}`"
    )


def _log_train(loop: Loop, state: TrainState, window: dict, bar) -> None:
    """A train record: the window's statistics (one reduction, one read) and its clock."""
    tick = loop.clock.close(state.step)
    totals = reduce_sums(loop.accelerator, window_sums(window)) if window else {"count": 0.0}
    window.clear()
    record = {f"train/{k}": v for k, v in loop.workload.summarize(totals).items()} if totals["count"] else {}
    record["train/lr"] = loop.scheduler.get_last_lr()[0]
    if tick:
        record |= throughput_record(
            loop.workload, loop.recipe, totals, tick, loop.peak_flops, loop.accelerator.num_processes, loop.steady
        )
    loop.log.log(record, state.step)
    shown = {"loss": f"{record['train/loss']:.4f}"} if "train/loss" in record else {}
    if "train/samples_per_s" in record:
        shown["samples_s"] = f"{record['train/samples_per_s']:.0f}"
    if "train/mfu" in record:
        shown["mfu"] = f"{record['train/mfu']:.1%}"
    bar.set_postfix(shown)


def _save_due(cfg, state, steps_per_epoch: int) -> bool:
    """Whether `checkpoint.every_steps` / `every_epochs` asks for a save at the end of this step."""
    if cfg.every_steps and state.step % cfg.every_steps == 0:
        return True
    epoch_done = state.step_in_epoch == steps_per_epoch
    return bool(cfg.every_epochs and epoch_done and (state.epoch + 1) % cfg.every_epochs == 0)


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
        # A tie keeps the later model: accuracy ties often (1.0 on a small dev set from the first
        # epoch), and the later model trained longer on the same data (the first one kept a val
        # loss of 0.78 against 0.36 at the end). Stated in the README and checkpoint.save_best.
        if state.best is None or sign * value >= sign * state.best:
            state.best = value
            if r.checkpoint.save_best:
                export.from_loop(loop, loop.run_dir / "best_model")
        if state.time_to_target_s is None and sign * value >= sign * r.target.value:
            # MLPerf-style: from before the data was touched to the first evaluation at the target.
            state.time_to_target_s = time.perf_counter() - loop.t_start
            metrics["time_to_target_s"] = state.time_to_target_s
    state.last_eval = metrics
    loop.log.log(metrics, state.step)
    print_eval(loop.accelerator, state.step, metrics)
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
