"""What a launched job's log says: a baseline's figures, or the job's error in one line.

A job's output (dltrain or a baseline script) goes to its log file; the harness reads back either
the JSON line a baseline prints or, on failure, the one line a person needs: dltrain's own
`dltrain: error: ...` when there is one, else the message of the exception that ended the
traceback (without the exception's module and class name when it is one of dltrain's user errors,
whose message is the whole story), else the signal that killed the process.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

# The last line of a Python traceback: `pkg.module.SomeError: message` (or the name alone).
_RAISED = re.compile(
    r"^(?P<name>(?:[A-Za-z_]\w*\.)*(?P<cls>[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)))(?::\s*(?P<msg>.*))?$"
)
# dltrain's errors a user can fix: the message names the problem and the fix, the class adds nothing.
USER_ERRORS = {"RecipeError", "DataError", "LaunchError", "StorageError", "TrainingError"}


def baseline_summary(log: Path, workload: str) -> dict | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    for line in reversed(lines):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_samples_per_s" in out:
            keys = ("train_samples_per_s", "step_time_ms_p50", "step_time_ms_p90")
            return {"workload": workload, "throughput": {k: out[k] for k in keys if k in out}, "baseline": out}
    return None


def _exception_line(line: str) -> str | None:
    """`dltrain.data.DataError: MNIST not found` -> `MNIST not found`; `KeyError: 'x'` ->
    `'x' (KeyError)`; a bare `MemoryError` -> `MemoryError (no message)`; None if not one."""
    m = _RAISED.match(line)
    if not m:
        return None
    message = (m["msg"] or "").strip()
    if not message:
        return f"{m['cls']} (no message)"
    return message if m["cls"] in USER_ERRORS else f"{message} ({m['cls']})"


def error_line(log: Path, rc: int) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    ours = [ln for ln in lines if ln.startswith("dltrain:") and ("error" in ln or "stopped" in ln)]
    if rc < 0:
        try:
            how = f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            how = f"killed by signal {-rc}"
        how += " (out of memory?)" if rc == -signal.SIGKILL else ""
    else:
        how = f"exit code {rc}"
    if ours:
        return f"{how}: {ours[-1][:300]}"
    raised = [text for text in map(_exception_line, lines) if text]
    last = (raised or lines or ["no output"])[-1]
    return f"{how}: {last[:300]}"
