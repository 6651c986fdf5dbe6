"""Fault injection for the tests: environment variables that stop, crash, pause or fail a real run
at a chosen point. Unset in normal use; each costs a dictionary lookup where it is checked.

  DLTRAIN_TEST_SIGNAL_AT_STEP=K[:RANK]  send this process DLTRAIN_TEST_SIGNAL (default SIGTERM) after step K
  DLTRAIN_TEST_CRASH_AT_STEP=K[:RANK]   exit hard (86) after step K, on the first torchrun attempt only
  DLTRAIN_TEST_PAUSE_IN_SAVE=N          sleep half-way through writing the N-th checkpoint
  DLTRAIN_TEST_ENOSPC_IN_SAVE=N         fail half-way through writing the N-th checkpoint as a full disk does
  DLTRAIN_TEST_FAIL_AT_STEP=N           raise after step N on rank DLTRAIN_TEST_FAIL_RANK (default 0)
  DLTRAIN_TEST_NONFINITE_AT_STEP=N      make step N's loss NaN on every rank (its gradients follow)
  DLTRAIN_TEST_STEP_SLEEP=S             sleep S seconds after every step of a SLURM job's first start
                                        (SLURM_RESTART_COUNT unset or 0): a scheduler's timed signal finds
                                        the job running; its requeued start runs at full speed
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path


def _hits(name: str, step: int, rank: int) -> bool:
    value = os.environ.get(name)
    if not value:
        return False
    at, _, only = value.partition(":")
    return int(at) == step and (not only or int(only) == rank)


_STEP_END_VARS = ("DLTRAIN_TEST_SIGNAL_AT_STEP", "DLTRAIN_TEST_STEP_SLEEP", "DLTRAIN_TEST_CRASH_AT_STEP")
_step_end_armed: bool | None = None  # None: not known, look every time


def arm() -> None:
    """Read once at the start of a run (dltrain.trainer.fit) whether any step-end hook is set:
    unset, at_step_end returns at once instead of looking up four variables every step (about
    5 us of a 1 ms step)."""
    global _step_end_armed
    _step_end_armed = any(os.environ.get(name) for name in _STEP_END_VARS)


def at_step_end(rank: int, step: int) -> None:
    if _step_end_armed is False:
        return
    if _hits("DLTRAIN_TEST_SIGNAL_AT_STEP", step, rank):
        os.kill(os.getpid(), getattr(signal, os.environ.get("DLTRAIN_TEST_SIGNAL", "SIGTERM")))
    if (pause := os.environ.get("DLTRAIN_TEST_STEP_SLEEP")) and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        time.sleep(float(pause))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and _hits("DLTRAIN_TEST_CRASH_AT_STEP", step, rank):
        print(f"dltrain-test: planted crash at step {step} on rank {rank}", file=sys.stderr, flush=True)
        os._exit(86)


_saves = 0


def in_save(tmp: Path) -> None:
    global _saves
    _saves += 1
    if os.environ.get("DLTRAIN_TEST_PAUSE_IN_SAVE") == str(_saves):
        print(f"dltrain-test: paused while writing {tmp}", file=sys.stderr, flush=True)
        time.sleep(3600)
    if os.environ.get("DLTRAIN_TEST_ENOSPC_IN_SAVE") == str(_saves):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def fail_at_step(rank: int) -> int | None:
    """The step after which this rank raises, so tests can check that the whole job then stops
    instead of hanging; None in normal use."""
    at = os.environ.get("DLTRAIN_TEST_FAIL_AT_STEP")
    if at and rank == int(os.environ.get("DLTRAIN_TEST_FAIL_RANK", "0")):
        return int(at)
    return None


def nonfinite_at_step() -> int | None:
    """The step whose loss the loop turns into NaN, to test the non-finite rule of each backend."""
    at = os.environ.get("DLTRAIN_TEST_NONFINITE_AT_STEP")
    return int(at) if at else None
