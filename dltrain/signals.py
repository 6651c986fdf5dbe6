"""Preemption signals. SIGTERM (what SLURM and Kubernetes send before killing a job) and SIGUSR1
(SLURM's `--signal=USR1@T` warning) only note that a stop was asked for; the training loop looks
at the note on the host every step, at no cost, and the ranks agree on stopping at their next
sync point (dltrain.trainer), where a checkpoint is written and the run exits with code 4.

The handlers are installed by the command-line entry point (`dltrain train`), not by the library:
a program that calls dltrain.run.train itself keeps its own handlers.
"""

from __future__ import annotations

import atexit
import signal

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_received: str | None = None


def install() -> None:
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _note)
    # At exit Python puts its handlers back to the default action, which for SIGUSR1 and SIGTERM is
    # death: a stop signal sent again while this process ends (SLURM's, or `dltrain launch` repeating
    # it until its workers end) would turn a clean stop into "killed by SIGUSR1". Ignored from here.
    atexit.register(_ignore)


def _ignore() -> None:
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _note(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def received() -> str | None:
    """The name of the stop signal this process got, or None."""
    return _received


def clear() -> None:
    global _received
    _received = None
