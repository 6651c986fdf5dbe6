"""Single-process dltrain jobs run inside the harness process (the suite's `in_process: true`).

A launched `python -m dltrain train` pays an interpreter start, the imports of torch,
transformers and accelerate, and a CUDA context: tens of seconds per job on a GPU machine, where a
lent GPU is counted in minutes. In process, `dltrain.run.train` gets the recipe the command line
would have built (the same `--set` assignments), the job's output goes to its log file (file
descriptors 1 and 2 are redirected, so output from C++ and compiler workers lands there too), and
an exception becomes the job's error. Between jobs, what one run leaves in the process is reset:
Python's record of the warnings already shown (so each job's log shows each warning site again: the
sync-debug warnings device_check.sh counts are counted per job, not once per process),
Accelerate's singleton states, torch.compile's caches, the CUDA peak-memory counter (each run
reports its own peak), and the process's peak RSS on Linux.

Only world size 1 on one node without DeepSpeed runs this way; baselines and everything else stay
launched processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from dltrain.api import reset_state  # noqa: F401 - between jobs, as dltrain.train resets before a run
from dltrain.bench.suite import VARIANT_KINDS


class JobTimeout(BaseException):
    """The job ran past the suite's timeout_s. A BaseException, so that library code catching
    Exception does not swallow it."""


def eligible(job, suite) -> bool:
    return (
        suite.in_process
        and job.kind in ("dltrain", *VARIANT_KINDS)
        and job.world == 1
        and job.nnodes == 1
        and job.deepspeed is None
    )


@contextlib.contextmanager
def _output_to(log: Path):
    """Python's sys.stdout/stderr (which need not write to fds 1 and 2, e.g. under pytest) and the
    file descriptors 1 and 2 (C++, child processes) into the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w", buffering=1) as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            out.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _warnings_of_this_job():
    """Each warning once per site for this job, into its log. Python shows a warning once per site
    per process (the `default` action's registry), so without this the second in-process job would
    show none of the host-sync warnings (torch.cuda.set_sync_debug_mode) the first one showed.
    catch_warnings() invalidates every site's registry on entry; the filter and the printer are
    set here because a caller (pytest) may record warnings instead of printing them."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _environment(env: dict[str, str], threads: int | None):
    """What the launched command gets from its environment: variables, and on a CPU its threads."""
    before_env = {k: os.environ.get(k) for k in env}
    before_threads = torch.get_num_threads()
    os.environ.update(env)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for k, v in before_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(before_threads)


@contextlib.contextmanager
def _time_limit(seconds: int):
    """SIGALRM raises JobTimeout in this (the main) thread; a long kernel or compile delays it
    until control returns to Python."""

    def expire(signum, frame):
        raise JobTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # someone else's alarm (e.g. pytest-timeout): give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - (time.monotonic() - t0), 1e-3), outer_interval)


def run(recipe, run_dir: Path, log: Path, *, env: dict[str, str], threads: int | None, timeout_s: int) -> str | None:
    """Train one job (its parsed recipe) in this process: None when it finished, else its error in one line."""
    from dltrain import allocator
    from dltrain.run import train

    allocator.tune()  # as `dltrain train` does for a launched job
    reset_state()
    error = None
    with _output_to(log), _environment(env, threads), _warnings_of_this_job():
        try:
            with _time_limit(timeout_s):
                train(recipe.model_copy(deep=True), output_dir=str(run_dir))  # a copy: the job's stays as planned
        except JobTimeout:
            error = f"timed out after {timeout_s} s (suite timeout_s)"
        except Exception as exc:  # the job's failure, not the harness's: record it and go on
            traceback.print_exc()
            text = str(exc).strip().splitlines()
            error = f"in process: {type(exc).__name__}: {text[0][:300] if text else ''}"
    reset_state()
    return error
