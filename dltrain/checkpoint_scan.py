"""Finding checkpoints: which step_<N> folders under a checkpoint root are complete and intact
(manifest, file sizes, checksums, a trainer state of the shape dltrain writes), and which one
`--resume` picks. Reads only; writing them, and the folder's layout, is dltrain.checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from dltrain import rundir
from dltrain.data import sha256_of
from dltrain.errors import RecipeError
from dltrain.state import TrainState

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"


def step_of(path: Path) -> int:
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
    return sorted(good, key=step_of), sorted(bad)


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
    good, bad = scan(rundir.checkpoint_root(recipe, run_dir, run_id))
    good = [p for p in good if rundir.owned_by(p, run_id)]
    bad = [(p, why) for p, why in bad if rundir.owned_by(p, run_id)]
    chosen = None
    for path in reversed(good):  # newest first; checksums are read only until one is intact
        why = problem_with(path)
        if why is None:
            chosen = path
            break
        bad.append((path, why))
    newest = step_of(chosen) if chosen else -1
    for path, why in sorted(bad):
        if verbose and step_of_safe(path) > newest:
            print(f"dltrain: warning: skipping checkpoint {path}: {why}", file=sys.stderr, flush=True)
    return chosen


def step_of_safe(path: Path) -> int:
    try:
        return step_of(path)
    except ValueError:
        return -1


def saved_state(path: Path | None) -> dict:
    """trainer_state.json of a checkpoint ({} for none): counters, run ids, the recipe. `locate`
    has checked its shape (problem_with)."""
    return _state_of(path) if path is not None else {}
