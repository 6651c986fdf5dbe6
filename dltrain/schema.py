"""`dltrain schema [WORKLOAD]`: every recipe key with its type, default and meaning, read from the
pydantic models that check recipes (so it cannot drift from what `dltrain train` accepts)."""

from __future__ import annotations

import enum
import sys
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dltrain.recipe_file import RecipeError


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(str(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    return "null" if value is None else repr(value)


def _section(annotation) -> type[BaseModel] | None:
    """The model of a nested section (`deepspeed: DeepSpeedConfig | None` too)."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every key, sections first listed as their keys.
    A key's description is pydantic's: the docstring under the field (dltrain.sections.Section sets
    use_attribute_docstrings), or a plugin's Field(description=...), on one line."""
    out = []
    for name, field in model.model_fields.items():
        if name == "profiles":  # merged away before validation
            continue
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        if section is not None:
            out += rows(section, key + ".")
            continue
        out.append((key, _type_name(field.annotation), _default(field), " ".join((field.description or "").split())))
    return out


def render(workload: str) -> str:
    from dltrain.workload import get_workload

    table = rows(get_workload(workload).recipe)
    width = max(len(k) for k, *_ in table)
    lines = [f"# recipe keys of the {workload} workload (set with --set KEY=VALUE or in the YAML)"]
    for key, kind, default, description in table:
        lines.append(f"{key:<{width}}  {kind}  [default {default}]" + (f"  {description}" if description else ""))
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("schema", help="every recipe key with its type, default and meaning")
    p.add_argument("workload", nargs="?", help="one workload (default: all)")


def cmd_schema(args) -> int:
    from dltrain.workload import get_workload, workload_names

    if args.workload is not None:
        get_workload(args.workload)  # an unknown name: one line listing the known ones
    names = [args.workload] if args.workload else workload_names()
    shown = []
    for name in names:
        try:
            shown.append(render(name))
        except RecipeError as exc:  # one broken plugin: named, and the other workloads still shown
            print(f"dltrain: warning: {exc}", file=sys.stderr, flush=True)
    print("\n\n".join(shown))
    return 0
