"""The Workload interface and the workload registry.

Everything that differs between a CNN, an RNN, BERT or a user's own model lives in a `Workload`;
the trainer, `dltrain inspect` and the benchmark harness call these fields and never ask which
workload they run. A workload is a plain dataclass of functions:

    recipe                      pydantic model (a dltrain.recipe.RecipeBase subclass whose
                                `workload` field is Literal["<name>"]): the common sections plus the
                                workload's own, typically `model` and `data`
    build_model(recipe)         -> torch.nn.Module
    build_data(recipe, device)  -> dltrain.data.DataSplits (train, val, optional test)
    forward(model, batch)       -> dltrain.workloads.common.Output(loss, stats): the mean loss to
                                   backpropagate and per-example statistics (e.g. loss, correct),
                                   which the trainer sums; evaluation needs "loss" among them
    flops_per_sample(recipe)    -> analytic training FLOPs per example (forward + backward)
    summarize(sums)             -> {"loss": ..., "accuracy": ...} from the summed statistics
                                   (`sums["count"]` is the number of examples); default: each
                                   statistic's mean
    batch_size_of(batch)        -> examples in a batch; default: the leading size of the first tensor
    metrics                     what evaluation reports ("val/loss", ...): recipe validation checks
                                `target.metric` against it (empty: no check)

Optional hooks (None: the default behaviour named):

    flops_of(recipe, sums)      -> {"flops": ..., "flops_real": ...} of a logged window from its
                                   summed statistics; default flops_per_sample x count
    save_model(model, state_dict, dir, recipe)  export in the workload's native format; default
                                   model.safetensors
    write_samples(recipe, out_dir) -> [paths]: sample inputs with labels for `dltrain inspect`
    build_split(recipe, device, split) -> the one held-out split ("val", "test") `dltrain eval`
                                   needs, or None where the data has none; default: build_data's
                                   (which reads the training data too)
    label_names(recipe)         -> class names by index, saved as id2label with an export
    flops_batch(recipe, device, n) -> the micro-batch of n examples whose FLOPs the bench harness
                                   counts against flops_per_sample (text: padded to max_length);
                                   default: the first n training examples
    tokens_of(batch)            -> tokens a batch computes on, padding included (text workloads):
                                   the harness turns it into FLOPs per padded token
    requires                    {module: pip extra} the workload imports beyond the core, e.g.
                                   {"torchvision": "vision"}: a missing one is one line naming the extra
    baselines                   bench baseline kind ("bare", "hf_trainer") -> script (a path, or a
                                   file name under benchmarks/baselines/); baseline_takes_recipe:
                                   whether the script takes --recipe/--profile/--set

The registry: built-in workloads (dltrain.workloads.BUILTIN), then those added in this process by
`register_workload(name, workload)`, then those other packages declare in the entry-point group
`dltrain.workloads` (`name = "package.module:WORKLOAD"`, a Workload).
Nothing is imported until a recipe asks for its workload by name.
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from dltrain.recipe_file import RecipeError, shown

ENTRY_POINT_GROUP = "dltrain.workloads"


def mean_of_stats(sums: dict[str, float]) -> dict[str, float]:
    """Each summed per-example statistic divided by the number of examples."""
    count = max(sums.get("count", 0.0), 1.0)
    return {k: v / count for k, v in sums.items() if k != "count"}


def leading_size(batch) -> int:
    """Examples in a batch: the leading size of a tensor, of the first tensor of a tuple or list,
    or of the first value of a dict."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return len(batch)


@dataclass(eq=False)
class Workload:
    """What a workload gives the trainer, `inspect` and the bench harness (see the module docstring)."""

    recipe: type
    build_model: Callable[[Any], Any]
    build_data: Callable[[Any, Any], Any]
    forward: Callable[[Any, Any], Any]
    flops_per_sample: Callable[[Any], int]
    summarize: Callable[[dict[str, float]], dict[str, float]] = mean_of_stats
    batch_size_of: Callable[[Any], int] = leading_size
    metrics: tuple[str, ...] = ()
    flops_of: Callable[[Any, dict[str, float]], dict[str, float]] | None = None
    save_model: Callable[..., None] | None = None
    write_samples: Callable[..., list] | None = None
    build_split: Callable[[Any, Any, str], Any] | None = None
    label_names: Callable[[Any], list[str] | None] | None = None
    flops_batch: Callable[[Any, Any, int], Any] | None = None
    tokens_of: Callable[[Any], int] | None = None
    baselines: dict[str, str] = field(default_factory=dict)
    baseline_takes_recipe: bool = True
    # module -> the pip extra that installs it (dltrain.extras): checked before a run starts
    requires: dict[str, str] = field(default_factory=dict)
    name: str = ""  # set by the registry

    def __post_init__(self) -> None:
        from dltrain.recipe import RecipeBase

        if not (isinstance(self.recipe, type) and issubclass(self.recipe, RecipeBase)):
            raise TypeError(f"Workload.recipe must be a dltrain.recipe.RecipeBase subclass, got {self.recipe!r}")
        for name in ("build_model", "build_data", "forward", "flops_per_sample", "summarize", "batch_size_of"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Workload.{name} must be callable, got {getattr(self, name)!r}")
        for name in ("flops_of", "save_model", "write_samples", "build_split", "label_names", "flops_batch", "tokens_of"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"Workload.{name} must be callable or None, got {getattr(self, name)!r}")
        self.metrics = tuple(self.metrics)


def _check_names_itself(name: str, workload: Workload) -> None:
    """The recipe class must accept `workload: <name>`, or every recipe for it would fail to validate."""
    annotation = workload.recipe.model_fields["workload"].annotation
    if typing.get_origin(annotation) is typing.Literal and name not in typing.get_args(annotation):
        raise TypeError(f"workload {name!r}: its recipe class {workload.recipe.__name__} takes workload "
                        f"{' or '.join(map(repr, typing.get_args(annotation)))}, not {name!r}: "
                        f"declare `workload: Literal[{name!r}]`")


# A plain dict: name -> the Workload, for those registered or loaded in this process.
_LOADED: dict[str, Workload] = {}


def register_workload(name: str, workload: Workload, *, replace: bool = False) -> Workload:
    """Add `workload` under `name` (what a recipe's `workload:` key takes). A name already taken by
    another workload is refused unless `replace` is true."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a workload name is an identifier (letters, digits, _), got {name!r}")
    if not isinstance(workload, Workload):
        raise TypeError(f"register_workload({name!r}, ...) takes a dltrain.Workload, got {type(workload).__name__}")
    current = _LOADED.get(name)
    if current is not None and current is not workload and not replace:
        raise ValueError(f"workload {name!r} is already registered: pass replace=True to replace it")
    _check_names_itself(name, workload)
    workload.name = name
    _LOADED[name] = workload
    return workload


def _entry_points() -> dict[str, Any]:
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)  # the first distribution on the path wins, as for imports
    return found


def workload_names() -> list[str]:
    """Every workload a recipe can name: built in, registered, or declared by an installed package."""
    from dltrain.workloads import BUILTIN

    return sorted(set(BUILTIN) | set(_LOADED) | set(_entry_points()))


def _load(name: str, target: str, what: str) -> Workload:
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except ImportError as exc:
        raise RecipeError(f"workload {name!r} ({what} {target}) cannot be imported: {exc}: install what it needs") from None
    except AttributeError as exc:
        raise RecipeError(f"workload {name!r} ({what} {target}) is broken: {exc}") from None
    if not isinstance(obj, Workload):
        raise RecipeError(f"workload {name!r} ({what} {target}) is a {type(obj).__name__}, not a dltrain.Workload")
    return obj


def get_workload(name: str) -> Workload:
    """The workload a recipe names, imported on first use. RecipeError for an unknown name."""
    from dltrain.workloads import BUILTIN

    if isinstance(name, str) and name in _LOADED:
        return _LOADED[name]
    if isinstance(name, str) and name in BUILTIN:
        return register_workload(name, _load(name, BUILTIN[name], "built in as"))
    eps = _entry_points() if isinstance(name, str) else {}
    if isinstance(name, str) and name in eps:
        return register_workload(name, _load(name, eps[name].value, f"entry point {ENTRY_POINT_GROUP}:"))
    raise RecipeError(f"unknown workload {shown(name)} at 'workload' (known: {', '.join(workload_names())}); "
                      f"a package adds one through the entry-point group '{ENTRY_POINT_GROUP}' or dltrain.register_workload")
