"""Checkpoints: periodic and preemption saves, atomic writes, keep-last-k, exact resume.

A checkpoint is a folder CKPT_ROOT/step_<N>/ (CKPT_ROOT is `checkpoint.dir`, default
RUN_DIR/checkpoints, confined to the run directory: dltrain.rundir) holding:

  what the run's backend writes (dltrain.strategy): Accelerate's save_state (model.safetensors,
                      optimizer.bin, random_states_<rank>.pkl, [scaler.pt]; DeepSpeed's own folders),
                      and for FSDP2 fsdp_sharded/ or model.safetensors + fsdp_optimizer.pt, as
                      distributed.fsdp.state_dict_type says
  scheduler.pt        the LR scheduler (ours: Accelerate reloads registered objects with
                      weights_only=False, so the scheduler is not registered with it)
  trainer_state.json  TrainState counters incl. the position inside the epoch, run id, W&B run id,
                      world size, global batch, elapsed time, the resolved recipe
  RUN_ID              the run's id, written first (so even an unfinished write says whose it is)
  manifest.json       written last: run id, size and sha256 of every file; a folder without it is
                      incomplete

Writes go to CKPT_ROOT/.tmp-step_<N>, are fsynced, get their manifest, and are renamed into place:
a run killed while writing leaves the previous checkpoints intact; a write that fails (full disk)
is removed and the run exits 2 naming the intact one. Old checkpoints of this run (its run id) are
deleted only after the new one is in place. Everything is loaded with torch.load(weights_only=True) or
safetensors. The data position needs no replay: the loop restarts the epoch's index stream at
`step_in_epoch` (dltrain.data.train_index_batches).

The training loop (dltrain.trainer) decides when to save and when to stop; this module only stores
and restores: save, prune, load, resume. Finding and checking checkpoints (scan, `--resume auto`'s
pick) is dltrain.checkpoint_scan's; model exports (final_model/, best_model/) are dltrain.export's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dltrain import rundir, storage, testhooks
from dltrain.checkpoint_scan import MANIFEST, STATE_FILE, scan, step_of, step_of_safe
from dltrain.data import sha256_of
from dltrain.errors import RecipeError, StorageError
from dltrain.recipe import dump_recipe

SCHEDULER_FILE = "scheduler.pt"
FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Writing


def _fsync_tree(path: Path) -> None:
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trainer_state(loop, state) -> dict:
    fields = {k: getattr(state, k) for k in state.__dataclass_fields__}
    if fields["step_in_epoch"] >= loop.steps_per_epoch:  # a finished epoch: resume at the next one
        fields["epoch"] += 1
        fields["step_in_epoch"] = 0
    return {
        "format": FORMAT,
        "state": fields,
        "run_id": loop.run_id,
        "wandb_run_id": loop.log.wandb_run_id,
        "world_size": loop.accelerator.num_processes,
        "global_batch": loop.plan.global_batch,
        "total_steps": loop.total_steps,
        "elapsed_s": time.perf_counter() - loop.t_start,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": dump_recipe(loop.recipe),
    }


def save(loop, state) -> Path:
    """Write step_<N> atomically (every rank takes part); return its path. A write that fails
    (a full disk, a quota) on any rank is removed, and every rank raises the same RecipeError
    naming the checkpoint that is intact and the space needed (StorageError): the run exits 2,
    nothing lost."""
    acc, main = loop.accelerator, loop.accelerator.is_main_process
    root = rundir.checkpoint_root(loop.recipe, loop.run_dir, loop.run_id)
    final, tmp = root / f"step_{state.step}", root / f".tmp-step_{state.step}"
    # DeepSpeed's save has collectives inside: a rank must not leave it early to report a failure.
    caught = storage.WRITE_ERRORS if not loop.strategy.save_is_collective else ()
    phases = [
        (main, lambda: _begin(root, tmp, final, loop.run_id)),
        (True, lambda: loop.strategy.save(tmp)),
        (main, lambda: _write_own_files(loop, state, tmp)),
        (main, lambda: _seal(loop, state, root, tmp, final)),
    ]
    for here, phase in phases:
        failed = None
        try:
            if here:
                phase()
        except caught as exc:
            failed = exc
        if not storage.agree_ok(acc, failed):
            _give_up(loop, root, tmp, failed)
    loop.last_checkpoint = str(final)
    return final


def _begin(root: Path, tmp: Path, final: Path, run_id: str) -> None:
    if final.exists() and not rundir.owned_by(final, run_id):  # a shared checkpoint.dir
        raise FileExistsError(
            errno.EEXIST,
            "another run's checkpoint of that step is there: give each run its own checkpoint.dir",
            str(final),
        )
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "RUN_ID").write_text(run_id + "\n")  # ownership of a write that never finishes


def _write_own_files(loop, state, tmp: Path) -> None:
    torch.save(loop.scheduler.state_dict(), tmp / SCHEDULER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(_trainer_state(loop, state), indent=1) + "\n")


def _seal(loop, state, root: Path, tmp: Path, final: Path) -> None:
    """Checksums, manifest (written last), rename into place, then prune."""
    testhooks.in_save(tmp)
    storage.with_umask_mode(tmp)  # safetensors writes its files 0600, unlike every other file
    _fsync_tree(tmp)
    files = {
        str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": FORMAT, "step": state.step, "run_id": loop.run_id, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # an older write of the same step (e.g. before a crash): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, loop.recipe.checkpoint.keep_last, loop.run_id)


def _give_up(loop, root: Path, tmp: Path, failed: Exception | None) -> None:
    acc = loop.accelerator
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    good = [p for p in scan(root)[0] if rundir.owned_by(p, loop.run_id)]
    intact = f"the last intact checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
    need = _size(good[-1]) if good else _state_bytes(loop)
    raise StorageError(
        storage.write_failure(
            failed, f"checkpoint {tmp.name[5:]} not written to {root}", intact, need, root, loop.run_dir
        )
    )


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _state_bytes(loop) -> int:
    """Model weights plus optimizer state, as a checkpoint of them would hold."""
    tensors = list(loop.model.state_dict().values())
    for per_param in loop.strategy.optimizer.state_dict().get("state", {}).values():
        tensors += [t for t in per_param.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _prune(root: Path, keep_last: int, run_id: str) -> None:
    """Keep the newest `keep_last` complete checkpoints of this run; clear its leftovers of
    interrupted writes. Checkpoints without this run's id (another run's, in a shared
    `checkpoint.dir`) are never deleted."""
    good, bad = scan(root)
    good = [p for p in good if rundir.owned_by(p, run_id)]
    for path in good[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    newest = step_of(good[-1]) if good else -1
    for path, _ in bad:
        if step_of_safe(path) < newest and rundir.owned_by(path, run_id):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Loading


def _check_model(strategy, path: Path) -> None:
    """Refuse a checkpoint of another model with a readable line, not a tensor-shape dump."""
    weights = strategy.saved_weights(path)
    if weights is None:
        return  # a layout of the backend's own (DeepSpeed's, FSDP's shards), which it checks itself
    from safetensors import safe_open

    # A sharded (DTensor) entry reports its whole shape, as a full checkpoint holds it.
    here = {k: tuple(v.shape) for k, v in strategy.module().state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        there = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key in sorted(here.keys() | there.keys()):
        if here.get(key) != there.get(key):
            raise RecipeError(
                f"checkpoint {path} was written for a different model: '{key}' is {there.get(key)} there, "
                f"{here.get(key)} in this recipe; resume with the recipe that wrote it"
            )


def load(loop, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states from `path`; return the saved
    TrainState fields."""
    acc = loop.accelerator
    meta = json.loads((path / STATE_FILE).read_text())
    if meta.get("global_batch") != loop.plan.global_batch:
        raise RecipeError(
            f"checkpoint {path} was trained with global batch {meta.get('global_batch')}, this recipe uses "
            f"{loop.plan.global_batch}: the position inside the epoch would point at other examples; "
            f"set train.global_batch_size={meta.get('global_batch')}"
        )
    saved_world = meta.get("world_size")
    if saved_world != acc.num_processes:
        if loop.strategy.shards_per_rank:
            raise RecipeError(
                f"checkpoint {path} holds ZeRO shards of {saved_world} processes, this run has {acc.num_processes}: "
                f"resume with {saved_world} processes"
            )
        if acc.is_main_process:
            print(
                f"dltrain: note: checkpoint written by {saved_world} processes, resuming with {acc.num_processes}: "
                "weights, optimizer and data position carry over; per-rank random states of new ranks start fresh",
                file=sys.stderr,
                flush=True,
            )
    _check_model(loop.strategy, path)
    try:
        loop.strategy.load(path)
        loop.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    except RecipeError:
        raise
    except Exception as exc:  # unpickling refusals, truncated files: all mean "do not use this one"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(
            f"cannot load checkpoint {path} ({type(exc).__name__}: {first[:200]}); pick another"
        ) from None
    loop.t_start -= meta.get("elapsed_s", 0.0)  # time-to-target counts the time before the restart
    loop.last_checkpoint = str(path)
    return meta["state"]


# ----------------------------------------------------------------------------------------------
# Resuming


def resume(loop, path: Path | None) -> dict | None:
    """Load `path`, the checkpoint rank 0 picked for `--resume` (every rank the same one); return
    the saved TrainState fields, or None for a fresh start. Reads only: the run directory is
    changed once every check has passed (dltrain.rundir.start_segment)."""
    acc = loop.accelerator
    t0 = time.perf_counter()
    state = load(loop, path) if path is not None else None
    if acc.is_main_process and state:
        print(
            f"dltrain: resuming at step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} "
            f"in it) from {path} (loaded in {time.perf_counter() - t0:.2f} s)",
            flush=True,
        )
    acc.wait_for_everyone()
    return state
