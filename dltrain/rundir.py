"""The run directory: who may write it, where its checkpoints may go, and what each segment of a run
changes in it.

A run directory belongs to one job at a time. Rank 0 holds an exclusive OS lock on RUN_DIR/.lock
(fcntl.flock) from before it looks at the directory until the process ends; the kernel releases it
when the process dies, however it dies, so a SIGKILLed run never blocks `--resume auto`. A second
job on the same directory is refused at once, naming the holder (pid, host, start time).

Files a run writes there:

  recipe.yaml               the recipe of the segment that started the directory
  recipe.resume-<N>.yaml    the recipe of each later segment, resumed from step N
  metrics.jsonl, summary.json, checkpoints/, final_model/, ...   (see dltrain.run)

  run.json                  the run's identity: its id (kept across resumes, carried by every
                            checkpoint), and where it was forked from when it started from another
                            run's checkpoint

Checkpoints go to RUN_DIR/checkpoints, or to `checkpoint.dir`: a relative one must stay inside
the run directory; one outside (absolute, or climbing out with ..) only with
`checkpoint.outside_run_dir: true`, and then into a folder of the run's own, DIR/run-<run_id>, so
runs sharing a folder never meet. Every checkpoint carries the run's id; `--resume auto` picks and
pruning deletes only checkpoints that carry it.

What a resume may change in the recipe is dltrain.resume_rules's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from dltrain.recipe import RecipeError, dump_recipe

LOCK_FILE = ".lock"


# ----------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """An exclusive lock on a run directory, held by this process until release() or its end."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = run_dir / LOCK_FILE
        # The lock is on the directory itself, which a user cannot delete under a live run as they
        # can the .lock file (a second job then took a lock of its own on a new file); .lock only
        # says who holds it.
        self._dir_fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder()
            os.close(self._dir_fd)
            self._dir_fd = self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RecipeError(
                    f"{run_dir} is in use by another run ({holder}): wait for it to end, or choose another --output-dir"
                ) from None
            raise RecipeError(
                f"cannot lock run directory {run_dir} ({exc.strerror}): choose another --output-dir"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)

    def _holder(self) -> str:
        try:
            who = json.loads(self.path.read_text() or "{}")
            return f"pid {who['pid']} on {who['host']}, started {who['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # closing the descriptor drops the flock
            self._dir_fd = None


# ----------------------------------------------------------------------------------------------
# Paths


def checkpoint_root(recipe, run_dir: Path, run_id: str) -> Path:
    """Where this run's checkpoints live; a `checkpoint.dir` leading out of the run directory is
    refused unless `checkpoint.outside_run_dir` says so, and holds the run's own folder."""
    configured = recipe.checkpoint.dir
    if not configured:
        return run_dir / "checkpoints"
    root = (run_dir / Path(configured).expanduser()).resolve()
    inside = root.is_relative_to(run_dir.resolve())
    if not inside and not getattr(recipe.checkpoint, "outside_run_dir", False):
        raise RecipeError(
            f"checkpoint.dir={configured} leads outside the run directory {run_dir}: use a path inside it, "
            "or set checkpoint.outside_run_dir=true to write checkpoints there"
        )
    return root if inside else root / f"run-{run_id}"


RUN_FILE = "run.json"


def read_identity(run_dir: Path) -> dict | None:
    """run.json of a run directory ({"run_id", ...}), None where the directory holds no run yet."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(
            f"{path} is unreadable ({exc}): it names the run that owns this directory; "
            "restore it, or start a new run in another --output-dir"
        ) from None
    if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str) or not identity["run_id"]:
        raise RecipeError(f"{path} does not hold a run id: restore it, or start a new run in another --output-dir")
    return identity


def write_identity(run_dir: Path, identity: dict) -> None:
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def owned_by(path: Path, run_id: str | None) -> bool:
    """Whether a checkpoint folder (complete or not) carries `run_id`: its RUN_ID file, the first
    thing a save writes (dltrain.checkpoint), so even an unfinished write says whose it is."""
    if not run_id:
        return False
    try:
        return (path / "RUN_ID").read_text().strip() == run_id
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# A segment's start


def start_segment(run_dir: Path, recipe, start: dict, step: int, ckpt_root: Path) -> dict:
    """What a segment changes in the run directory, once every check has passed (a refused start
    leaves the directory as it was): the run's identity and its segments, the preemption note,
    the log records past the checkpoint, interrupted checkpoint writes of this run, the
    segment's recipe. Returns the identity (run.json)."""
    identity = read_identity(run_dir) or {
        "run_id": start["run_id"],
        "forked_from": start["forked_from"],
        "segments": [],
    }
    identity.setdefault("segments", []).append({"from_step": step, "changes": start["changes"] if step else []})
    write_identity(run_dir, identity)
    (run_dir / "preempted.json").unlink(missing_ok=True)
    truncate_log(run_dir, step)
    stale = clean_stale_writes(ckpt_root)
    if stale:
        print(
            f"dltrain: note: removed {len(stale)} unfinished checkpoint write(s) left by an earlier segment: "
            + ", ".join(p.name for p in stale),
            file=sys.stderr,
            flush=True,
        )
    write_segment_recipe(run_dir, recipe, step)
    return identity


def clean_stale_writes(root: Path) -> list[Path]:
    """Temporaries of checkpoint writes that a crash interrupted. The root is this run's own
    (inside its locked directory, or its run-<id> folder in a shared one): every one is its own."""
    stale = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_segment_recipe(run_dir: Path, recipe, resumed_step: int) -> Path:
    """recipe.yaml for the segment that starts the directory, recipe.resume-<N>.yaml after."""
    first = resumed_step == 0 or not (run_dir / "recipe.yaml").exists()
    path = run_dir / ("recipe.yaml" if first else f"recipe.resume-{resumed_step}.yaml")
    path.write_text(dump_recipe(recipe))
    return path


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop records written after the checkpoint (the resumed run writes those steps again) and
    any line a crash or a full disk left unfinished."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return
    kept, broken = [], 0
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            broken += 1
    if broken:
        print(
            f"dltrain: warning: {log}: dropped {broken} unreadable line(s) (a run cut off while writing)",
            file=sys.stderr,
            flush=True,
        )
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log)


def write_preempted(run_dir: Path, step: int, path: Path, why: str) -> None:
    (run_dir / "preempted.json").write_text(json.dumps({"step": step, "checkpoint": str(path), "signal": why}) + "\n")
