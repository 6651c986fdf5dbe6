"""One training run from a validated recipe: run directory, Accelerator, fit, evaluate, report."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import torch

from dltrain import allocator, tracking
from dltrain.accel import build_accelerator, check_ranks_in_sync
from dltrain.metrics import peak_memory_bytes, rates
from dltrain.peaks import peak_flops
from dltrain.recipe import RecipeError, dump_recipe
from dltrain.trainer import Loop, TrainState, build_optimizer, build_scheduler, evaluate, fit, total_steps_for
from dltrain.workloads import WORKLOADS


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
        path = Path(os.environ.get("DLTRAIN_RUNS_DIR", "runs")) / f"{recipe.name}-{stamp}"
    if accelerator.num_processes > 1:
        box = [str(path)]
        broadcast_object_list(box)
        path = Path(box[0])
    return path.resolve()


def prepare_run_dir(path: Path, resume: str | None) -> None:
    if (path / "metrics.jsonl").exists() and not resume:
        raise RecipeError(f"{path} already holds a run: pass --resume auto to continue it, or another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"cannot write to output directory {path} ({exc.strerror}): choose another --output-dir") from None


def train(recipe, output_dir: str | None = None, resume: str | None = None) -> dict:
    t_start = time.perf_counter()  # before the data is touched: time-to-target counts from here
    allocator.tune()  # before the data and the model allocate anything
    workload = WORKLOADS[recipe.workload]
    accelerator, plan = build_accelerator(recipe, run_dir=None)
    run_dir = choose_run_dir(recipe, output_dir, accelerator)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, resume)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    accelerator.wait_for_everyone()
    accelerator.project_configuration.set_directories(str(run_dir))
    print0(accelerator, f"dltrain: {recipe.name} -> {run_dir}")
    print0(accelerator, f"  world {plan.world} x micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} = global batch {plan.global_batch}, {recipe.train.precision}, device {accelerator.device}")

    if accelerator.device.type == "cuda" and os.environ.get("DLTRAIN_SYNC_DEBUG"):
        # "warn" or "error" on every host sync (the device check counts them); "default" is off.
        torch.cuda.set_sync_debug_mode(os.environ["DLTRAIN_SYNC_DEBUG"])
    # Explicit, because torch's defaults differ: TF32 off for matmuls, on for cuDNN convolutions.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = recipe.train.tf32
    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
    model = workload.build_model(recipe)
    data = workload.build_data(recipe, accelerator.device)
    total_steps, per_epoch = total_steps_for(recipe, len(data.train), plan.global_batch)
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    optimizer = build_optimizer(recipe.optim, model.parameters(), deepspeed=deepspeed)
    scheduler = build_scheduler(recipe.schedule, optimizer, total_steps)
    # The scheduler is stepped by the loop once per optimizer step; Accelerate's wrapper would step
    # it once per process instead.
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not registered with Accelerate: it would reload it with weights_only=False;
    # dltrain.checkpoint saves and loads it itself.
    from dltrain import checkpoint

    log = tracking.RunLog(accelerator, run_dir, recipe, run_id=checkpoint.wandb_run_id(run_dir, recipe, resume))
    peak, peak_source = peak_flops(accelerator.device, recipe.train.precision, recipe.train.tf32)
    loop = Loop(recipe, workload, accelerator, plan, model, optimizer, scheduler, data, log,
                total_steps=total_steps, steps_per_epoch=per_epoch, t_start=t_start, run_dir=run_dir, peak_flops=peak, peak_source=peak_source)
    saved = checkpoint.resume(loop, run_dir, resume)
    state = TrainState(**saved) if saved else TrainState()
    print0(accelerator, f"  {len(data.train)} train / {len(data.val)} val examples, {per_epoch} steps per epoch, "
                        f"{total_steps} steps, host sync every {loop.sync_every} steps"
                        + (f", compiled ({recipe.train.compile.mode})" if recipe.train.compile.enabled else ""))

    state = fit(loop, state)
    check_ranks_in_sync(accelerator, model)
    final = dict(state.last_eval)
    if data.test is not None:
        final |= evaluate(model, data.test, workload, accelerator, plan.micro_batch, "test")
        log.log({k: v for k, v in final.items() if k.startswith("test/")}, state.step)
    if recipe.checkpoint.save_final_model:
        checkpoint.export_model(loop, run_dir / "final_model")
    summary = _summary(loop, state, final, run_dir, time.perf_counter() - t_start)
    if accelerator.is_main_process:
        tracking.write_json(run_dir / "summary.json", summary)
        if recipe.tracking.plots:
            tracking.plot_curves(log.records(), run_dir)
        _print_summary(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
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
        "metrics": metrics,
        "throughput": throughput,
        "flops_per_sample": flops,
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
        print(f"  {t['overall_samples_per_s']:,.0f} samples/s over all {t['train_wall_s']:.1f} s of training, "
              f"evaluation ({t['eval_s']:.1f} s) and checkpoints ({t['checkpoint_s']:.1f} s) taken out")
    print(f"  results in {summary['run_dir']}")
