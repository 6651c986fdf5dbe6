"""The training loop. It never asks which workload it runs: workloads/ supplies model, data and loss."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dltrain import checkpoint, export, signals, testhooks
from dltrain.data import DataError, eval_index_batches, steps_per_epoch, train_index_batches
from dltrain.metrics import StepClock, add_train_stats, throughput_record, window_sums
from dltrain.optim import build_optimizer, build_scheduler, use_fused  # noqa: F401  (the loop's builders, by their old names)
from dltrain.progress import print_eval, progress_bar


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite loss); the message says where and what to do."""


class Preempted(Exception):
    """A signal asked the run to stop; a checkpoint was written. The CLI exits with code 4."""


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
    index_batches = list(eval_index_batches(len(split), batch=batch, rank=accelerator.process_index,
                                            world=accelerator.num_processes, device=accelerator.device))
    for (_, n_real), b in zip(index_batches, split.batches(idx for idx, _ in index_batches)):
        add_stats(sums, workload.forward(model, b).stats, n_real)
    model.train()
    totals = reduce_sums(accelerator, sums)
    return {f"{prefix}/{k}": v for k, v in workload.summarize(totals).items()} | {f"{prefix}/examples": int(totals["count"])}


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class Loop:
    """What the loop needs, built once by dltrain.run.train()."""

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
    run_dir: Path
    peak_flops: float | None = None  # per process, for MFU; None where unknown (e.g. a MIG slice)
    peak_source: str = ""
    clock: StepClock | None = None
    throughput: dict = field(default_factory=dict)  # the clock's summary at the end of fit()
    last_checkpoint: str | None = None
    run_id: str = ""  # carried by every checkpoint of the run (dltrain.rundir); pruning deletes only those
    steady: dict = field(default_factory=dict)  # FLOPs and tokens summed over the steady log windows

    def __post_init__(self) -> None:
        # Accelerate's optimizer wrapper does work of its own only with a GradScaler (fp16) or on
        # XLA; otherwise its step() and zero_grad() call the wrapped optimizer's, after package
        # lookups on the file system (is_lomo_available, inspect.signature) that cost ~70 us per
        # step, 7% of an RNN step on a CPU. Call the wrapped optimizer directly then.
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        opt, train = self.optimizer, self.recipe.train
        self.scaler = getattr(opt, "scaler", None)
        wrapped = isinstance(opt, AcceleratedOptimizer)  # not when dltrain shards the model itself (dltrain.fsdp)
        direct = not wrapped or (self.scaler is None and self.accelerator.distributed_type
                                 not in (DistributedType.XLA, DistributedType.DEEPSPEED))
        self._inner = opt.optimizer if wrapped and direct else opt
        # Likewise Accelerator.backward divides the loss by the accumulation steps, a graph node
        # even when that is 1; without accumulation, a scaler or DeepSpeed it is loss.backward().
        self._plain_backward = direct and self.plan.grad_accum == 1
        # torch's fused optimizers skip their update on the device when `found_inf` is non-zero
        # (GradScaler's mechanism): a non-finite loss then needs no host read before the step.
        # Elsewhere (unfused, DeepSpeed, fp16's own scaler) the loss is read back every step.
        self.guard_on_device = direct and bool(self._inner.defaults.get("fused"))
        self.sync_every = train.sync_every or (1 if self.accelerator.device.type == "cpu"
                                               and self.accelerator.num_processes == 1 else 50)
        self.forward = self.workload.forward
        if train.compile.enabled:
            # The function is compiled, not the module: state_dict keys stay the module's own, so
            # checkpoints and exports of a compiled run load into an uncompiled model.
            c = train.compile
            # nn.RNN/GRU/LSTM are refused by dynamo (a graph break, an error under fullgraph) unless
            # this lets it trace them as their decomposition (torch calls it experimental).
            torch._dynamo.config.allow_rnn = True
            self.forward = torch.compile(self.workload.forward, mode=c.mode, fullgraph=c.fullgraph, dynamic=c.dynamic)
        self.pending: list[tuple[str, int, torch.Tensor]] = []  # device flags since the last sync

    def backward(self, loss: torch.Tensor) -> None:
        if self._plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def zero_grad(self) -> None:
        self._inner.zero_grad(set_to_none=True)


def fit(loop: Loop, state: TrainState) -> TrainState:
    """The training loop: each step, then its end in the order things happen: host-side sync
    point, log record, evaluation, checkpoint, preemption. One clock (dltrain.metrics.StepClock)
    covers all of it except evaluation and checkpoint writes, which it times apart."""
    r, acc, plan = loop.recipe, loop.accelerator, loop.plan
    clock = loop.clock = StepClock(acc.device, r.train.warmup_steps_excluded, plan.global_batch, start_step=state.step)
    bar = progress_bar(loop.total_steps, state.step, acc.is_main_process)  # plain lines when not on a terminal
    window: dict = {}  # per-step statistics since the last log record, as device tensors
    fail_at = testhooks.fail_at_step(acc.process_index)
    loop.model.train()
    reached = False  # the target, when target.stop ends training there
    while state.step < loop.total_steps and not reached:
        batches = loop.data.train.batches(
            train_index_batches(
                len(loop.data.train), micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                rank=acc.process_index, world=plan.world, seed=r.train.seed, epoch=state.epoch,
                start_step=state.step_in_epoch, device=acc.device,
                # a split that groups by length (BERT's data.order: length_grouped) says by what
                lengths=getattr(loop.data.train, "order_lengths", None), group=getattr(loop.data.train, "group", 0),
            )
        )
        while state.step_in_epoch < loop.steps_per_epoch and state.step < loop.total_steps and not reached:
            _train_step(loop, batches, window, state)
            state.step += 1
            state.step_in_epoch += 1
            clock.step_done(state.step)
            bar.update(1)
            if state.step == fail_at:
                raise RuntimeError(f"injected failure on rank {acc.process_index} at step {fail_at} (DLTRAIN_TEST_FAIL_AT_STEP)")
            testhooks.at_step_end(acc.process_index, state.step)
            # The step's end. Nothing below reads from the device except at a sync point.
            last = state.step == loop.total_steps
            log_due = state.step % r.train.log_every == 0 or last
            eval_due = _eval_due(r, state, state.step_in_epoch == loop.steps_per_epoch, loop.total_steps)
            save_due = checkpoint.due(r.checkpoint, state, loop.steps_per_epoch)
            alone_stopping = acc.num_processes == 1 and signals.received() is not None  # no one to agree with
            stop = False
            if state.step % loop.sync_every == 0 or last or eval_due or save_due or alone_stopping:
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


def _train_step(loop: Loop, batches, window: dict, state: TrainState) -> None:
    """One optimizer step: grad_accum micro-batches, and no host read where the optimizer can skip
    a non-finite update itself (see Loop). Every statement runs once per step, so each costs: on a
    1 ms step (the RNN on a CPU) a few tensor ops are several percent."""
    acc, model = loop.accelerator, loop.model
    loss_sum = None  # of the micro-batch losses: non-finite iff one of them is
    for _ in range(loop.plan.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        loop.clock.add_data_wait(time.perf_counter() - t0)
        with acc.accumulate(model) if loop.plan.grad_accum > 1 else nullcontext():
            out = loop.forward(model, batch)
            loss = out.loss.detach()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            add_train_stats(window, loss, out.stats, loop.workload.batch_size_of(batch))
            loop.backward(out.loss)
            if acc.sync_gradients:
                if acc.num_processes > 1:  # every rank must take the same decision
                    loss_sum = acc.reduce(loss_sum, reduction="sum")
                _optimizer_step(loop, loss_sum, state)


def _optimizer_step(loop: Loop, loss_sum: torch.Tensor, state: TrainState) -> None:
    step = state.step + 1  # the step being taken
    if loop.guard_on_device:
        bad = (~torch.isfinite(loss_sum)).float()
        loop._inner.found_inf = bad  # the fused step leaves weights, moments and its count alone
        loop.pending.append(("nonfinite", step, bad))
    elif not math.isfinite(loss_sum.item()):
        loop.zero_grad()
        _count_nonfinite(loop, state, step)
        return
    if loop.recipe.train.clip_grad_norm:
        loop.accelerator.clip_grad_norm_(loop.model.parameters(), loop.recipe.train.clip_grad_norm)
    # The scale as a device tensor (`get_scale()` would read it back to the host).
    scale_before = loop.scaler._get_scale_async().clone() if loop.scaler is not None else None
    loop._inner.step()
    if scale_before is not None:
        # GradScaler always calls a fused optimizer's step (which skips on the device), so
        # Accelerate's `step_was_skipped` never fires; a skipped step is one that lowered the scale.
        loop.pending.append(("skipped", step, scale_dropped(loop.scaler, scale_before)))
    if loop.recipe.schedule.name != "none":  # a constant schedule has nothing to step
        loop.scheduler.step()
    loop.zero_grad()


def scale_dropped(scaler, scale_before: torch.Tensor) -> torch.Tensor:
    """1.0 (on the device) when the GradScaler's update lowered the scale: it found inf/NaN
    gradients and the step was skipped."""
    return (scaler._get_scale_async() < scale_before).float()


def _sync(loop: Loop, state: TrainState) -> bool:
    """A sync point: the one host read between them. Learns which steps since the last sync had a
    non-finite loss (not applied) or an fp16 skip, and whether any rank was asked to stop."""
    acc = loop.accelerator
    flags = [flag.reshape(1) for _, _, flag in loop.pending]
    several = acc.num_processes > 1
    if several:  # ranks agree on stopping here, not with a collective every step
        asked = 1.0 if signals.received() else 0.0
        flags.append(torch.full((1,), asked, device=acc.device))
    vector = torch.cat(flags) if flags else None
    if several:
        vector = acc.reduce(vector, reduction="sum")
    values = vector.tolist() if vector is not None else []
    pending, loop.pending = loop.pending, []
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
        checkpoint.write_preempted(loop.run_dir, state.step, path, why)
    acc.wait_for_everyone()
    acc.end_training()  # a clean shutdown of the process group and trackers before exiting
    raise Preempted(f"stopped by {why} at step {state.step}; checkpoint {path}; continue with "
                    f"`--resume auto --output-dir {loop.run_dir}`")


def _log_train(loop: Loop, state: TrainState, window: dict, bar) -> None:
    """A train record: the window's statistics (one reduction, one read) and its clock."""
    tick = loop.clock.close(state.step)
    totals = reduce_sums(loop.accelerator, window_sums(window)) if window else {"count": 0.0}
    window.clear()
    record = {f"train/{k}": v for k, v in loop.workload.summarize(totals).items()} if totals["count"] else {}
    record["train/lr"] = loop.scheduler.get_last_lr()[0]
    if tick:
        record |= throughput_record(loop.workload, loop.recipe, totals, tick, loop.peak_flops,
                                    loop.accelerator.num_processes, loop.steady)
    loop.log.log(record, state.step)
    shown = {"loss": f"{record['train/loss']:.4f}"} if "train/loss" in record else {}
    if "train/samples_per_s" in record:
        shown["samples_s"] = f"{record['train/samples_per_s']:.0f}"
    if "train/mfu" in record:
        shown["mfu"] = f"{record['train/mfu']:.1%}"
    bar.set_postfix(shown)


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

