"""Running a launcher in the foreground for `dltrain launch`: stop signals forwarded to every
worker, and a preemption told apart from a failure.

A preempted job's workers write their checkpoint, rank 0 notes it in RUN_DIR/preempted.json, and
they exit 0 (LAUNCHED_ENV); the launcher then reports the stop and exits 4, as `dltrain train`
does when preempted, so launch/slurm.sbatch can requeue the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dltrain.errors import LaunchError

FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1")
STOPS = ("SIGTERM", "SIGUSR1")  # ask for a checkpoint and a stop (dltrain.signals)
REFORWARD_S = 5.0  # a worker still importing when a stop signal came ignored it: it is sent again
# Set in the workers' environment: a preempted worker then exits 0 once every rank has written its
# part of the checkpoint, and this launcher, not the worker, reports the preemption (exit 4).
LAUNCHED_ENV = "DLTRAIN_LAUNCHED"


def run_command(argv: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run the launcher in the foreground; (its exit code, the stop signal this process forwarded
    or None). The exit code is the job's (non-zero if any rank failed).

    torchrun starts each worker in a session of its own, so a signal sent to this process alone
    (`kill PID`, a container's stop) would leave the workers training on, holding the run
    directory's lock. SIGTERM, SIGINT and SIGUSR1 are therefore forwarded to every worker, which
    checkpoints and stops (dltrain.signals), and forwarded again every few seconds until they end.
    The launchers between (accelerate's, torchrun's agent) ignore SIGTERM and SIGUSR1: they start
    with both ignored (inherited across exec) and torchrun is told to catch only SIGINT, SIGHUP and
    SIGQUIT, so a stop signal that reaches them too (SLURM signals every process of a step) never
    makes torchrun SIGTERM a rank still writing its checkpoint. A worker that gets a signal twice
    stops once."""
    forwarded: list[str] = []
    caught = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle, less SIGTERM (PET_: its option's variable)
    child_env = {
        **os.environ,
        **env,
        LAUNCHED_ENV: "1",
        "PET_SIGNALS_TO_HANDLE": caught,
        "TORCHELASTIC_SIGNALS_TO_HANDLE": caught,
    }
    # Not SIGINT: a process that starts with it ignored gets no KeyboardInterrupt (Ctrl-C) from Python.
    previous = {name: signal.signal(getattr(signal, name), signal.SIG_IGN) for name in STOPS}
    try:
        try:
            child = subprocess.Popen(argv, env=child_env)
        except FileNotFoundError:
            raise LaunchError(
                f"{argv[0]} not found: install accelerate in this environment (pip install accelerate)"
            ) from None
        alone = argv[0] == sys.executable  # `python -m dltrain train`: the child is the one worker

        def send(signum) -> None:
            for pid in [child.pid] if alone else _workers(child.pid):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        def forward(signum, frame) -> None:
            forwarded.append(signal.Signals(signum).name)
            send(signum)

        for name in FORWARDED:
            previous.setdefault(name, signal.signal(getattr(signal, name), forward))
        while True:
            try:
                return child.wait(timeout=REFORWARD_S), (forwarded[0] if forwarded else None)
            except subprocess.TimeoutExpired:
                if forwarded and forwarded[0] in STOPS:
                    send(getattr(signal, forwarded[0]))
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _workers(pid: int) -> list[int]:
    """The training processes under the launcher `pid`: its children when it is accelerate's or
    torchrun's agent, or itself when it is the one training process."""
    import psutil

    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    return [c.pid for c in children] or [pid]


def run_job(argv: list[str], env: dict[str, str], output_dir: str | None) -> int:
    """Run the launcher `argv` until it ends; its exit code, or 4 when the workers stopped for a
    signal with their checkpoint written."""
    try:
        rc, stopped = run_command(argv, env)
    except LaunchError as exc:
        print(f"dltrain: error: {exc}", file=sys.stderr)
        return 2
    note = Path(output_dir) / "preempted.json" if output_dir else None
    # The workers wrote the note (rank 0, after every rank's checkpoint) and exited 0 (LAUNCHED_ENV);
    # every run's start removes an earlier note (dltrain.rundir.start_segment).
    if (rc == 0 or stopped) and note is not None and note.is_file():
        try:
            saved = json.loads(note.read_text())
            step, why = saved.get("step", "?"), saved.get("signal") or stopped or "a signal"
        except (OSError, ValueError, AttributeError):
            step, why = "?", stopped or "a signal"
        if os.environ.get("SLURM_JOB_ID"):  # launch/slurm.sbatch requeues the job on exit 4
            print(f"dltrain launch: preempted by {why} at step {step}, checkpoint written", file=sys.stderr)
        else:
            print(
                f"dltrain launch: stopped by {why} at step {step}, checkpoint written; continue with "
                f"--resume auto --output-dir {output_dir}",
                file=sys.stderr,
            )
        return 4  # as `dltrain train` exits when preempted
    if rc != 0:
        print(
            f"dltrain launch: the job failed (exit {rc}); the failing rank's error is above, under [rankN]",
            file=sys.stderr,
        )
    return rc
