"""What a run prints while it runs: the progress bar, and one line per evaluation.

On a terminal the bar redraws itself in place. Elsewhere (a SLURM log, a pipe, a CI job) a bar's
carriage-return updates pile up into one unreadable line, so it prints a plain line instead, at
most every PLAIN_INTERVAL_S seconds, and once at the end. Only the main process speaks.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0  # between progress lines in a log file


class _Lines:
    """A file for tqdm that turns each in-place redraw ("\\r" + status) into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        status = text.replace("\r", "").rstrip()
        if status:
            self.stream.write(status + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, initial: int, enabled: bool):
    stream = sys.stderr
    tty = stream.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=tty,
        mininterval=0.5 if tty else PLAIN_INTERVAL_S,
        file=stream if tty else _Lines(stream),
        ascii=None if tty else True,
    )


def eval_line(step: int, metrics: dict) -> str:
    """`eval step 200 (epoch 1.00): val/loss 0.0512, val/accuracy 0.9841`."""
    shown = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if "/" in k and not k.endswith("/examples")
    )
    return f"eval step {step} (epoch {metrics.get('epoch', 0.0):.2f}): {shown}"


def print_eval(accelerator, step: int, metrics: dict) -> None:
    """One line on the main process as the evaluation ends, above the bar (tqdm.write keeps it whole)."""
    if accelerator.is_main_process:
        tqdm.write(eval_line(step, metrics), file=sys.stdout)
        sys.stdout.flush()
