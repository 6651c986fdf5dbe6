"""Reading a recipe or suite file without letting it crash or swamp the process: size, encoding,
YAML errors, alias bombs and depth are refused in one line before anything copies, merges,
validates or echoes the document; `--set` overrides and profile merging. dltrain.recipe re-exports
these names.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any

import yaml

from dltrain.errors import RecipeError  # noqa: F401 - raised here, and imported from here elsewhere

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; a megabyte of YAML is not one
MAX_EXPANDED_SIZE = 1 << 20  # characters of text plus 8 per value, aliases expanded
MAX_DEPTH = 32  # nesting of mappings and lists (a recipe has 3 levels; PyYAML recurses per level)


_SHOWN = reprlib.Repr()  # Python 3.11's takes no keyword arguments
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 60, 60, 60
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = 4


def shown(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, on one line, without expanding a large value first:
    an error message echoes what the user wrote, never hundreds of MB of it."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int past Python's digit limit; never fail a message
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 80) -> str:
    """User text (a key, an assignment) for a one-line message: control characters escaped, cut."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_size(raw: Any, source: str) -> None:
    """Refuse a document whose aliases expand to an absurd size or that nests absurdly deep,
    before anything copies, merges, validates or prints it. YAML aliases share one object, so a
    'billion laughs' (lists of lists of an alias, 0.5 KB of YAML) costs nothing to load; it is
    everything after (deepcopy, validation, repr in an error) that would expand it. A shared value
    is sized once here (memo by id), so this walk is linear in the file."""
    sizes: dict[int, int] = {}
    walking: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if isinstance(node, (str, bytes)):
            return 8 + len(node)
        if not isinstance(node, (dict, list, tuple, set)):
            return 8
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in walking:
            raise RecipeError(f"{source}: a value contains itself (a recursive YAML alias): write the value out")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{source}: values nested more than {MAX_DEPTH} levels deep: not a recipe")
        walking.add(key)
        total = 8
        for item in [*node.keys(), *node.values()] if isinstance(node, dict) else node:
            total += size(item, depth + 1)
            if total > MAX_EXPANDED_SIZE:
                raise RecipeError(
                    f"{source}: expands to more than {MAX_EXPANDED_SIZE >> 20} MiB once its YAML "
                    "aliases (*name) are expanded: not a recipe (an alias bomb?)"
                )
        walking.discard(key)
        sizes[key] = total
        return total

    size(raw, 0)


def _safe_load(text: str, source: str) -> Any:
    """yaml.safe_load, every failure a RecipeError (PyYAML also raises ValueError, for an integer
    past Python's 4300-digit limit or a date like 2024-13-01, and RecursionError when deep)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{source}: invalid YAML{where}: {clip(problem, 200)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        raise RecipeError(f"{source}: invalid YAML: {clip(str(exc), 200)}") from None


def parse_value(text: str) -> Any:
    """Type an override the way YAML would (`3` -> int, `1e-3` -> float, `[1,2]` -> list)."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return text
    # YAML 1.1 reads '1e-3' as a string; the schema coerces numeric strings anyway.
    return value


def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    if "=" not in assignment:
        raise RecipeError(f"{source} '{clip(assignment)}': expected key.path=value")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"{source} '{clip(assignment)}': empty key in path '{clip(path)}'")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            prefix = clip(".".join(keys[: i + 1]))
            raise RecipeError(f"{source} '{clip(assignment)}': '{prefix}' is a value, not a section")
        node = child
    node[keys[-1]] = parse_value(text)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_text(path: Path, what: str = "recipe") -> str:
    """The file's text: UTF-8 and under MAX_RECIPE_BYTES, or a RecipeError that says which."""
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{path}: {path.stat().st_size:,} bytes, over the {MAX_RECIPE_BYTES >> 20} MiB "
                f"a {what} may have: not a {what}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}): save the {what} as UTF-8"
        ) from None


def read_yaml(path: Path, what: str = "recipe") -> dict:
    path = Path(path)
    if not path.is_file():
        hint = " (see `dltrain list` for the shipped recipes)" if what == "recipe" else ""
        raise RecipeError(f"{path}: {what} file not found{hint}")
    raw = _safe_load(read_text(path, what), str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {what} must be a YAML mapping, got {type(raw).__name__}")
    check_size(raw, str(path))
    return raw
