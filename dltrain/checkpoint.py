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

The training loop (dltrain.trainer) decides when to save and when to stop; this module only stores:
save, locate, load, prune. Model exports (final_model/, best_model/) are dltrain.export's.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dltrain import rundir, testhooks
from dltrain.data import sha256_of
from dltrain.errors import RecipeError, StorageError
from dltrain.recipe import dump_recipe
from dltrain.state import TrainState

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def ckpt_root(recipe, run_dir: Path, run_id: str) -> Path:
    return rundir.checkpoint_root(recipe, run_dir, run_id)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def problem_with(path: Path, *, checksums: bool = True) -> str | None:
    """Why `path` is not a complete, intact checkpoint (None when it is)."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return "not a directory"
    if not manifest.is_file():
        return "incomplete (no manifest: the run stopped while writing it)"
    files = _manifest_files(manifest)
    if files is None:
        return "corrupt manifest.json"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if checksums and sha256_of(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    if _state_of(path) is None:
        return f"{STATE_FILE} is not a trainer state"
    return None


def _manifest_files(manifest: Path) -> dict | None:
    """{file: {"size", "sha256"}} of a manifest, None for one that is not JSON of that shape."""
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(files, dict) and all(
        isinstance(meta, dict)
        and isinstance(meta.get("size"), int)
        and isinstance(meta.get("sha256"), str)
        and isinstance(name, str)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        for name, meta in files.items()
    )
    return files if ok else None


def _state_of(path: Path) -> dict | None:
    """trainer_state.json of a checkpoint when it has the shape dltrain writes, else None."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("state"), dict)
        and isinstance(meta.get("recipe"), str)
        and isinstance(meta.get("run_id"), str)
        and isinstance(meta["state"].get("step"), int)
    ):
        return None
    fields = set(meta["state"])
    return meta if fields <= {f.name for f in dataclasses.fields(TrainState)} else None


def scan(root: Path, *, checksums: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete or damaged one, why)]). Without `checksums`
    only the manifest and the file sizes are checked: cheap enough for every save."""
    good, bad = [], []
    if not root.is_dir():
        return good, bad
    for path in root.iterdir():
        if path.name.startswith(".tmp-step_"):
            bad.append((path, "incomplete (interrupted while writing)"))
        elif path.name.startswith("step_") and path.name[5:].isdigit():
            why = problem_with(path, checksums=checksums)
            (bad.append((path, why)) if why else good.append(path))
    return sorted(good, key=_step_of), sorted(bad)


def locate(
    run_dir: Path, recipe, resume: str | None, run_id: str | None = None, *, verbose: bool = True
) -> Path | None:
    """The checkpoint to resume from: `auto` = the newest complete one of run `run_id` (None if
    there is none: a fresh start, so a restarted job can always pass --resume auto), else the
    given path."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser().resolve()
        if not path.exists():
            raise RecipeError(f"--resume {resume}: no such checkpoint directory")
        if (path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir():
            raise RecipeError(
                f"--resume {resume} is a run directory, not a checkpoint: continue it with "
                f"--resume auto --output-dir {resume}, or pass one of its checkpoints/step_N"
            )
        why = problem_with(path)
        if why:
            raise RecipeError(f"--resume {resume}: checkpoint is {why}; pick another (see {path.parent})")
        return path
    if run_id is None:
        return None  # a directory that holds no run yet has no checkpoint of its own
    good, bad = scan(ckpt_root(recipe, run_dir, run_id))
    good = [p for p in good if rundir.owned_by(p, run_id)]
    bad = [(p, why) for p, why in bad if rundir.owned_by(p, run_id)]
    chosen = None
    for path in reversed(good):  # newest first; checksums are read only until one is intact
        why = problem_with(path)
        if why is None:
            chosen = path
            break
        bad.append((path, why))
    newest = _step_of(chosen) if chosen else -1
    for path, why in sorted(bad):
        if verbose and _step_of_safe(path) > newest:
            print(f"dltrain: warning: skipping checkpoint {path}: {why}", file=sys.stderr, flush=True)
    return chosen


def _step_of_safe(path: Path) -> int:
    try:
        return _step_of(path)
    except ValueError:
        return -1


def saved_state(path: Path | None) -> dict:
    """trainer_state.json of a checkpoint ({} for none): counters, run ids, the recipe. `locate`
    has checked its shape (problem_with)."""
    return _state_of(path) if path is not None else {}


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
    root = ckpt_root(loop.recipe, loop.run_dir, loop.run_id)
    final, tmp = root / f"step_{state.step}", root / f".tmp-step_{state.step}"
    # DeepSpeed's save has collectives inside: a rank must not leave it early to report a failure.
    caught = rundir.WRITE_ERRORS if not loop.strategy.save_is_collective else ()
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
        if not rundir.agree_ok(acc, failed):
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
    rundir.with_umask_mode(tmp)  # safetensors writes its files 0600, unlike every other file
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
        rundir.write_failure(
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
    newest = _step_of(good[-1]) if good else -1
    for path, _ in bad:
        if _step_of_safe(path) < newest and rundir.owned_by(path, run_id):
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
