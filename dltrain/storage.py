"""Writes that fail cleanly: what a failed write raises, every rank agreeing that one failed, and
the one line that says what is still intact and how much space the write needed (a full disk
without an errno included); and the file mode of written weights. Used by the checkpoint writer
(dltrain.checkpoint) and the model export (dltrain.export).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

# What a failed write raises: OSError, torch's zip writer's RuntimeError (a full disk without an
# errno), safetensors' own SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def agree_ok(acc, failed: Exception | None) -> bool:
    """True when no rank failed; one collective (a barrier's worth) per phase of a save."""
    if acc.num_processes == 1:
        return failed is None
    import torch  # here: `dltrain --help` imports this module's callers, and torch costs seconds

    flag = torch.tensor([0.0 if failed is None else 1.0], device=acc.device)
    return acc.reduce(flag, reduction="sum").item() == 0


def with_umask_mode(folder: Path) -> None:
    """Give the weights in `folder` the mode a new file gets (0666 less the umask), as every other
    file dltrain writes has. safetensors (0.8) writes *.safetensors with mode 0600 whatever the umask
    (transformers' save_pretrained goes through it too): other users of a shared model folder could
    read its config but not its weights."""
    mask = os.umask(0)  # reading the umask sets it: put it straight back (no thread writes meanwhile)
    os.umask(mask)
    for path in folder.glob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def write_failure(failed: Exception | None, head: str, intact: str, need: int, where: Path, run_dir) -> str:
    """The one line for a write into `where` that failed. torch's zip writer and safetensors report
    a full disk without an errno: little free space then tells."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    code = getattr(failed, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < need)
    if full:
        what = failed.strerror if code else os.strerror(errno.ENOSPC)
    elif failed is None:
        what = "failed on another rank"
    else:
        what = (
            getattr(failed, "strerror", None) or (str(failed).strip().splitlines() or [type(failed).__name__])[0][:200]
        )
    if not full:
        return f"{head} ({what}); {intact}"
    space = f"it needs about {_mb(need)}" + (f", {_mb(free)} free" if free is not None else "")
    return f"{head} ({what}; {space}); {intact}: free space and continue with --resume auto --output-dir {run_dir}"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"
