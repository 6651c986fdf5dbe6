"""One training run from a validated recipe: run directory, Accelerator, fit, evaluate, report."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import torch

from dltrain import checkpoint, checkpoint_scan, export, extras, resume_rules, rundir, strategy, tracking
from dltrain.accel import build_accelerator
from dltrain.errors import RecipeError, StorageError
from dltrain.launched import cpu_threads
from dltrain.metrics import peak_memory_bytes, rates
from dltrain.optim import build_optimizer, build_scheduler
from dltrain.peaks import peak_flops
from dltrain.state import Loop, TrainState
from dltrain.trainer import evaluate, fit, sync_debug_mode, total_steps_for
from dltrain.workload import get_workload


def print0(accelerator, *args) -> None:
    """Only rank 0 speaks."""
    if accelerator.is_main_process:
        print(*args, flush=True)


def choose_run_dir(recipe, output_dir: str | None, accelerator) -> Path:
    """Every rank must agree on the directory: rank 0 picks, the others receive it."""
    from accelerate.utils import broadcast_object_list

    if output_dir:
        path = Path(output_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(os.environ.get("DLTRAIN_RUNS_DIR", "runs"))
        path = root / f"{recipe.name}-{stamp}"
        for n in range(2, 100):  # two runs started within the same second get their own directories
            if not path.exists():
                break
            path = root / f"{recipe.name}-{stamp}-{n}"
    if accelerator.num_processes > 1:
        box = [str(path)]
        broadcast_object_list(box)
        path = Path(box[0])
    return path.resolve()


def lock_run_dir(path: Path, resume: str | None) -> rundir.RunLock:
    """Create the directory if need be and take its lock; refuse one that holds another run."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(
            f"cannot write to output directory {path} ({exc.strerror}): choose another --output-dir"
        ) from None
    lock = rundir.RunLock(path)
    if (path / "metrics.jsonl").exists() and not resume:
        lock.release()
        raise RecipeError(f"{path} already holds a run: pass --resume auto to continue it, or another --output-dir")
    return lock


def start_point(run_dir: Path, recipe, resume: str | None) -> dict:
    """What this segment starts from, decided before anything is loaded or written: the
    checkpoint (none for a fresh start), the recipe changes it allows, the run's identity. A
    checkpoint of another run, into a new directory, starts a new run (a fork) that records where
    it came from; every refusal is raised here or before the first write (dltrain.rundir)."""
    identity = rundir.read_identity(run_dir)
    own = identity["run_id"] if identity else None
    path = checkpoint_scan.locate(run_dir, recipe, resume, own)
    meta = checkpoint_scan.saved_state(path)
    theirs = meta.get("run_id")
    if path is not None and own is not None and theirs != own:
        raise RecipeError(
            f"{run_dir} holds run {own} and {path} is a checkpoint of run {theirs}: to start from it, "
            "give a new --output-dir (a fork)"
        )
    if path is None and resume and (run_dir / "metrics.jsonl").exists():
        if (run_dir / "summary.json").exists():
            raise RecipeError(
                f"{run_dir} holds a finished run and no checkpoint of it to continue from: nothing to "
                "resume; start a new run with another --output-dir"
            )
        # Stopped before its first checkpoint: it starts over, as the recipe it began with says.
        first = run_dir / "recipe.yaml"
        if first.is_file():
            resume_rules.recipe_changes(first.read_text(), recipe, first)
    changes = resume_rules.recipe_changes(meta["recipe"], recipe, path) if path is not None else []
    run_id = own or rundir.new_run_id()
    rundir.checkpoint_root(recipe, run_dir, run_id)  # refuses a checkpoint.dir leading out of the run
    fork = path is not None and own is None
    forked_from = {"checkpoint": str(path), "run_id": theirs, "step": meta["state"]["step"]} if fork else None
    return {
        "path": str(path) if path else "",
        "changes": changes,
        "run_id": run_id,
        "new_run": own is None,
        "forked_from": forked_from,
        "wandb_run_id": None if fork else meta.get("wandb_run_id"),
    }


def open_run_dir(accelerator, recipe, run_dir: Path, resume: str | None) -> tuple[rundir.RunLock | None, dict]:
    """Rank 0 locks and checks the directory and picks the start point; every rank gets the same
    answer, or raises the same one-line error (no rank is left waiting for one that gave up)."""
    lock, start, error = None, {}, ""
    if accelerator.is_main_process:
        try:
            lock = lock_run_dir(run_dir, resume)
            start = start_point(run_dir, recipe, resume)
        except RecipeError as exc:
            if lock is not None:
                lock.release()
            lock, error = None, str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error, start]
        broadcast_object_list(box)
        error, start = box
    if error:
        raise RecipeError(error)
    return lock, start


def train(recipe, output_dir: str | None = None, resume: str | None = None) -> dict:
    """Train `recipe` into `output_dir` (or a new directory under runs/); the run directory is
    locked for the whole run (dltrain.rundir). Process-wide settings (signal handlers, the host
    allocator) are the caller's: `dltrain train` installs them, the library (dltrain.train) does not."""
    t_start = time.perf_counter()  # before the data is touched: time-to-target counts from here
    if resume == "auto" and not output_dir:
        raise RecipeError(
            "resume='auto' (--resume auto) continues the run in its output directory: give it "
            "(output_dir, --output-dir RUN_DIR)"
        )
    extras.check_recipe(recipe, get_workload(recipe.workload))  # a missing extra: one line, before any work
    accelerator, plan = build_accelerator(recipe, run_dir=None)
    run_dir = choose_run_dir(recipe, output_dir, accelerator)
    lock, start = open_run_dir(accelerator, recipe, run_dir, resume)
    threads_before = torch.get_num_threads()  # a notebook's own setting comes back after the run
    try:
        return _train(recipe, accelerator, plan, run_dir, start, resume, t_start)
    finally:
        torch.set_num_threads(threads_before)
        if lock is not None:
            lock.release()


def _train(recipe, accelerator, plan, run_dir: Path, start: dict, resume: str | None, t_start: float) -> dict:
    workload = get_workload(recipe.workload)
    accelerator.project_configuration.set_directories(str(run_dir))
    print0(accelerator, f"dltrain: {recipe.name} -> {run_dir}")
    threads = ""
    if accelerator.device.type == "cpu":  # N processes of all-cores threads each would time-slice the cores
        n, why = cpu_threads(recipe.train.cpu_threads)
        torch.set_num_threads(n)
        threads = f", {n} CPU thread{'s' if n > 1 else ''} per process ({why})"
    print0(
        accelerator,
        f"  world {plan.world} x micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} = "
        f"global batch {plan.global_batch}, {recipe.train.precision}, device {accelerator.device}{threads}",
    )

    sync_debug_mode(accelerator.device)  # a bad DLTRAIN_SYNC_DEBUG fails here, before any work
    # Explicit, because torch's defaults differ: TF32 off for matmuls, on for cuDNN convolutions.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = recipe.train.tf32
    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
    model = workload.build_model(recipe)
    data = workload.build_data(recipe, accelerator.device)
    total_steps, per_epoch = total_steps_for(recipe, len(data.train), plan.global_batch)
    backend = strategy.create(accelerator, recipe, plan)
    backend.setup(model, lambda m: build_optimizer(recipe.optim, m, fused_default=backend.fused_optimizer))
    scheduler = build_scheduler(recipe.schedule, backend.stepped_optimizer(), total_steps)
    parallel = backend.describe()
    if parallel:
        print0(accelerator, f"  {parallel}")

    peak, peak_source = peak_flops(accelerator.device, recipe.train.precision, recipe.train.tf32)
    loop = Loop(
        recipe,
        workload,
        backend,
        plan,
        scheduler,
        data,
        run_dir=run_dir,
        run_id=start["run_id"],
        total_steps=total_steps,
        steps_per_epoch=per_epoch,
        t_start=t_start,
        peak_flops=peak,
        peak_source=peak_source,
    )
    saved = checkpoint.resume(loop, Path(start["path"]) if start["path"] else None)
    state = TrainState(**saved) if saved else TrainState()
    changes = start["changes"] if saved else []
    if changes:
        resume_rules.apply_to_optimizer(changes, recipe, backend.optimizer, scheduler)
        print0(accelerator, f"dltrain: resuming with changes: {resume_rules.describe(changes)}")
    if state.step > total_steps:
        raise RecipeError(
            f"the checkpoint is at step {state.step}, past the end of this recipe ({total_steps} steps): "
            "raise train.epochs or train.max_steps to continue training"
        )
    log = loop.log = tracking.RunLog(
        accelerator, run_dir, recipe, run_id=start["wandb_run_id"] if accelerator.is_main_process else None
    )
    identity = {}
    if accelerator.is_main_process:  # every check has passed: now the directory may change
        identity = rundir.start_segment(
            run_dir, recipe, start, state.step, rundir.checkpoint_root(recipe, run_dir, start["run_id"])
        )
        if resume and not saved:
            print(f"dltrain: starting from scratch: no complete checkpoint of this run in {run_dir} yet", flush=True)
    print0(
        accelerator,
        f"  {len(data.train)} train / {len(data.val)} val examples, {per_epoch} steps per epoch, "
        f"{total_steps} steps, host sync every {loop.sync_every} steps"
        + (f", compiled ({recipe.train.compile.mode})" if recipe.train.compile.enabled else ""),
    )

    state = fit(loop, state)
    backend.check_replicas()
    final = dict(state.last_eval)
    if data.test is not None:
        final |= evaluate(backend.model, data.test, workload, accelerator, plan.micro_batch, "test")
        log.log({k: v for k, v in final.items() if k.startswith("test/")}, state.step)
    unsaved = None  # a final model that could not be written: the summary is written first, then the run exits 2
    if recipe.checkpoint.save_final_model:
        try:
            export.from_loop(loop, run_dir / "final_model")
        except StorageError as exc:
            unsaved = exc
    summary = _summary(loop, state, final, run_dir, time.perf_counter() - t_start) | {
        "resumed_with_changes": resume_rules.changes_so_far(identity),
        "forked_from": start["forked_from"],
        "final_model": None if unsaved or not recipe.checkpoint.save_final_model else str(run_dir / "final_model"),
    }
    if accelerator.is_main_process:
        tracking.write_json(run_dir / "summary.json", summary)
        if recipe.tracking.plots and extras.installed("matplotlib"):
            tracking.plot_curves(log.records(), run_dir)
        elif recipe.tracking.plots:
            print(
                "dltrain: note: no loss/accuracy plots: matplotlib is not installed "
                f"({extras.install_hint('matplotlib')})"
            )
        _print_summary(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if unsaved is not None:
        raise unsaved
    return summary


def _summary(loop: Loop, state: TrainState, final: dict, run_dir: Path, wall_s: float) -> dict:
    recipe, acc = loop.recipe, loop.accelerator
    last_train = next((r for r in reversed(loop.log.records()) if "train/loss" in r), {})
    metrics = {k: v for k, v in final.items() if "/" in k and k != "time_to_target_s"}
    metrics |= {k: v for k, v in last_train.items() if k in ("train/loss", "train/accuracy", "train/mse")}
    throughput = dict(loop.throughput)
    throughput |= rates(loop.steady, throughput.get("train_samples_per_s"), loop.peak_flops, acc.num_processes)
    throughput["peak_flops_per_s"], throughput["peak_source"] = loop.peak_flops, loop.peak_source
    # Analytic, at the recipe's shapes (for text: padded to data.max_length, an upper bound under
    # dynamic padding); the logged windows count FLOPs on the batches actually trained.
    flops = loop.workload.flops_per_sample(recipe)
    return {
        "recipe": recipe.name,
        "workload": recipe.workload,
        "run_dir": str(run_dir),
        "run_id": loop.run_id,
        "metrics": metrics,
        "throughput": throughput,
        "flops_per_sample": flops,
        "compute_dtypes": loop.workload.compute_dtypes(recipe, acc.device.type) if loop.workload.compute_dtypes else {},
        "time_to_target_s": state.time_to_target_s,
        "target": recipe.target.model_dump() if recipe.target else None,
        "steps": state.step,
        "epochs": state.step / loop.steps_per_epoch,
        "nonfinite_steps": state.nonfinite_steps,
        "skipped_steps": state.skipped_steps,
        "batch": {"global": loop.plan.global_batch, "micro": loop.plan.micro_batch, "grad_accum": loop.plan.grad_accum},
        "wall_s": wall_s,
        "eval_s": throughput.get("eval_s"),
        "checkpoint_s": throughput.get("checkpoint_s"),
        "memory": peak_memory_bytes(acc.device),
        "wandb_run_id": loop.log.wandb_run_id,
        "environment": tracking.environment(acc, recipe),
    }


def _print_summary(summary: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary["metrics"].items()) if isinstance(v, float))
    tput = summary["throughput"].get("train_samples_per_s")
    print(f"dltrain: done in {summary['wall_s']:.1f} s; {shown}")
    t = summary["throughput"]
    if tput:
        mfu = f", MFU {t['mfu']:.1%} ({t['peak_source']})" if t.get("mfu") is not None else ""
        print(f"  steady-state {tput:,.0f} train samples/s over {t['steady_steps']} steps{mfu}")
    if "overall_samples_per_s" in t:
        print(
            f"  {t['overall_samples_per_s']:,.0f} samples/s over all {t['train_wall_s']:.1f} s of training, "
            f"evaluation ({t['eval_s']:.1f} s) and checkpoints ({t['checkpoint_s']:.1f} s) taken out"
        )
    print(f"  results in {summary['run_dir']}")
