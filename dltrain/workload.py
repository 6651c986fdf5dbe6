"""The Workload interface and the workload registry.

Everything that differs between a CNN, an RNN, BERT or a user's own model lives in a `Workload`;
the trainer, `dltrain inspect` and the benchmark harness call these fields and never ask which
workload they run. A workload is a plain dataclass of functions:

    recipe                      pydantic model (a dltrain.recipe.RecipeBase subclass whose
                                `workload` field is Literal["<name>"]): the common sections plus the
                                workload's own, typically `model` and `data`
    build_model(recipe)         -> torch.nn.Module
    build_data(recipe, device)  -> dltrain.data.DataSplits (train, val, optional test)
    forward(model, batch)       -> dltrain.plugin.Output(loss, stats): the mean loss to
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
    compute_dtypes(recipe, device_type) -> {part: dtype} where a part of the model computes in
                                   another dtype than train.precision says (summary.json's
                                   `compute_dtypes`); default: none
    requires                    {module: pip extra} the workload imports beyond the core, e.g.
                                   {"torchvision": "vision"}: a missing one is one line naming the extra
    baselines                   bench baseline kind ("bare", "hf_trainer") -> script (a path, or a
                                   file name under benchmarks/baselines/); baseline_takes_recipe:
                                   whether the script takes --recipe/--profile/--set
    bench_variants              bench baseline kind ("notebook") -> the `--set` assignments that make
                                   a dltrain run of the recipe into that baseline (e.g. the original
                                   notebook's data pipeline)

Each function's signature is a Protocol below (BuildModel, BuildData, Forward, ...), checked when a
Workload is built; dltrain.plugin gathers them with the helpers a plugin imports.

The registry: built-in workloads (dltrain.workloads.BUILTIN), then those added in this process by
`register_workload(name, workload)`, then those other packages declare in the entry-point group
`dltrain.workloads` (`name = "package.module:WORKLOAD"`, a Workload).
Nothing is imported until a recipe asks for its workload by name.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from dltrain.recipe_file import RecipeError, shown

if TYPE_CHECKING:  # for the signatures only: importing this module loads no torch
    import torch

    from dltrain.data import DataSplits, Split
    from dltrain.sections import RecipeBase

ENTRY_POINT_GROUP = "dltrain.workloads"


class Output(NamedTuple):
    """What a workload's forward returns: the mean loss to backpropagate and per-example statistics."""

    loss: torch.Tensor  # mean over the batch; what is backpropagated
    # Per-example values, summed by the trainer. Evaluation needs "loss" among them; in training
    # the trainer logs the mean `loss` itself and ignores a "loss" statistic.
    stats: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The signatures a workload implements: one Protocol per Workload field. `Workload(...)` checks
# each function given against its Protocol's parameters (dltrain.workload.signature_problem), so a
# plugin whose build_data takes one argument fails at registration, not in the first step.
# `recipe` is the workload's own RecipeBase subclass; `batch` is whatever its Split.fetch returns.


class BuildModel(Protocol):
    def __call__(self, recipe: RecipeBase, /) -> torch.nn.Module:
        """The model, on the CPU, initialized from the global torch seed (the trainer sets it)."""


class BuildData(Protocol):
    def __call__(self, recipe: RecipeBase, device: torch.device | str, /) -> DataSplits:
        """The train, val and (optional) test splits, on `device` or the host."""


class Forward(Protocol):
    def __call__(self, model: torch.nn.Module, batch: Any, /) -> Output:
        """The mean loss to backpropagate and per-example statistics (dltrain.plugin.Output);
        evaluation needs "loss" among the statistics."""


class FlopsPerSample(Protocol):
    def __call__(self, recipe: RecipeBase, /) -> int:
        """Analytic training FLOPs per example, forward and backward (MFU)."""


class Summarize(Protocol):
    def __call__(self, sums: dict[str, float], /) -> dict[str, float]:
        """Metrics ("loss", "accuracy", ...) from the statistics summed over a split; sums["count"]
        is the number of examples (default: each statistic's mean)."""


class BatchSizeOf(Protocol):
    def __call__(self, batch: Any, /) -> int:
        """The number of examples in a batch (default: the leading size of its first tensor)."""


class FlopsOf(Protocol):
    def __call__(self, recipe: RecipeBase, sums: dict[str, float], /) -> dict[str, float]:
        """{"flops": ..., "flops_real": ...} of a logged window from its summed statistics."""


class SaveModel(Protocol):
    def __call__(self, model: torch.nn.Module, state_dict: dict, out_dir: Path, recipe: RecipeBase, /) -> None:
        """Write the model into `out_dir` in the workload's own format (default: model.safetensors)."""


class WriteSamples(Protocol):
    def __call__(self, recipe: RecipeBase, out_dir: Path, /) -> list[Path]:
        """Write sample inputs with their labels for `dltrain inspect`; return the files written."""


class BuildSplit(Protocol):
    def __call__(self, recipe: RecipeBase, device: torch.device | str, split: str, /) -> Split | None:
        """The one held-out split ("val", "test") `dltrain eval` needs, reading no other; None
        where the data has no such split."""


class LabelNames(Protocol):
    def __call__(self, recipe: RecipeBase, /) -> list[str] | None:
        """Class names by index, saved with an export as id2label."""


class FlopsBatch(Protocol):
    def __call__(self, recipe: RecipeBase, device: torch.device | str, n: int, /) -> Any:
        """The micro-batch of n examples whose FLOPs the bench harness counts against flops_per_sample."""


class TokensOf(Protocol):
    def __call__(self, batch: Any, /) -> int:
        """Tokens a batch computes on, padding included (text workloads)."""


class ComputeDtypes(Protocol):
    def __call__(self, recipe: RecipeBase, device_type: str, /) -> dict[str, str]:
        """What parts of the model compute in, where it differs from train.precision (e.g. a layer
        a kernel runs in another dtype than autocast asks); {} where nothing differs."""


# Workload field -> the Protocol its function follows.
SIGNATURES: dict[str, type] = {
    "build_model": BuildModel,
    "build_data": BuildData,
    "forward": Forward,
    "flops_per_sample": FlopsPerSample,
    "summarize": Summarize,
    "batch_size_of": BatchSizeOf,
    "flops_of": FlopsOf,
    "save_model": SaveModel,
    "write_samples": WriteSamples,
    "build_split": BuildSplit,
    "label_names": LabelNames,
    "flops_batch": FlopsBatch,
    "tokens_of": TokensOf,
    "compute_dtypes": ComputeDtypes,
}


def signature_problem(fn: Any, protocol: type) -> str | None:
    """Why `fn` cannot be called as `protocol` says (its positional arguments), None when it can.
    Parameters past the protocol's are allowed with defaults; keyword-only ones must have defaults."""
    expected = [p for p in inspect.signature(protocol.__call__).parameters.values()][1:]  # without self
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    takes_rest = any(p.kind is p.VAR_POSITIONAL for p in params)
    shown_sig = f"({', '.join(p.name for p in expected)})"
    if len(required) > len(expected):
        names = ", ".join(p.name for p in required)
        return f"requires {len(required)} arguments ({names}); it is called with {shown_sig}"
    if len(positional) < len(expected) and not takes_rest:
        return f"takes {len(positional)} positional arguments; it is called with {shown_sig}"
    keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        return f"requires keyword argument {keyword_only[0]}, which is never passed; it is called with {shown_sig}"
    return None


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
    build_model: BuildModel
    build_data: BuildData
    forward: Forward
    flops_per_sample: FlopsPerSample
    summarize: Summarize = mean_of_stats
    batch_size_of: BatchSizeOf = leading_size
    metrics: tuple[str, ...] = ()
    flops_of: FlopsOf | None = None
    save_model: SaveModel | None = None
    write_samples: WriteSamples | None = None
    build_split: BuildSplit | None = None
    label_names: LabelNames | None = None
    flops_batch: FlopsBatch | None = None
    tokens_of: TokensOf | None = None
    compute_dtypes: ComputeDtypes | None = None
    baselines: dict[str, str] = field(default_factory=dict)
    baseline_takes_recipe: bool = True
    bench_variants: dict[str, list[str]] = field(default_factory=dict)
    # module -> the pip extra that installs it (dltrain.extras): checked before a run starts
    requires: dict[str, str] = field(default_factory=dict)
    name: str = ""  # set by the registry

    def __post_init__(self) -> None:
        from dltrain.sections import RecipeBase

        if not (isinstance(self.recipe, type) and issubclass(self.recipe, RecipeBase)):
            raise TypeError(f"Workload.recipe must be a dltrain.recipe.RecipeBase subclass, got {self.recipe!r}")
        for name in ("build_model", "build_data", "forward", "flops_per_sample", "summarize", "batch_size_of"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Workload.{name} must be callable, got {getattr(self, name)!r}")
        for name in (
            "flops_of",
            "save_model",
            "write_samples",
            "build_split",
            "label_names",
            "flops_batch",
            "tokens_of",
            "compute_dtypes",
        ):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"Workload.{name} must be callable or None, got {getattr(self, name)!r}")
        for name, protocol in SIGNATURES.items():
            fn = getattr(self, name)
            if fn is not None and (problem := signature_problem(fn, protocol)) is not None:
                raise TypeError(
                    f"Workload.{name} ({getattr(fn, '__name__', fn)!s}) {problem}: "
                    f"see dltrain.workload.{protocol.__name__}"
                )
        self.metrics = tuple(self.metrics)


def _check_names_itself(name: str, workload: Workload) -> None:
    """The recipe class must accept `workload: <name>`, or every recipe for it would fail to validate."""
    annotation = workload.recipe.model_fields["workload"].annotation
    if typing.get_origin(annotation) is typing.Literal and name not in typing.get_args(annotation):
        raise TypeError(
            f"workload {name!r}: its recipe class {workload.recipe.__name__} takes workload "
            f"{' or '.join(map(repr, typing.get_args(annotation)))}, not {name!r}: "
            f"declare `workload: Literal[{name!r}]`"
        )


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


_WARNED: set[str] = set()


def _entry_points() -> dict[str, Any]:
    """Installed packages' workloads by name. One whose name a built-in workload has is not used,
    and said so once (a plugin cannot replace `cnn` by being installed)."""
    from dltrain.workloads import BUILTIN

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:
            if ep.name not in _WARNED:
                _WARNED.add(ep.name)
                owner = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
                print(
                    f"dltrain: warning: {owner}'s entry point {ENTRY_POINT_GROUP}:{ep.name} ({ep.value}) names a "
                    f"built-in workload and is not used: rename it",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        found.setdefault(ep.name, ep)  # the first distribution on the path wins, as for imports
    return found


def workload_names() -> list[str]:
    """Every workload a recipe can name: built in, registered, or declared by an installed package."""
    from dltrain.workloads import BUILTIN

    return sorted(set(BUILTIN) | set(_LOADED) | set(_entry_points()))


def _load(name: str, target: str, what: str) -> Workload:
    """Import a workload; whatever a broken plugin does while being imported (raise, exit, fail to
    parse) is one RecipeError naming it, and leaves the other workloads usable."""
    module, _, attr = target.partition(":")
    if not module or not all(part.isidentifier() for part in [*module.split("."), *(attr.split(".") if attr else [])]):
        raise RecipeError(
            f"workload {name!r} ({what} {target}) is not 'package.module:ATTRIBUTE': fix the plugin's entry point"
        )
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except ImportError as exc:
        raise RecipeError(
            f"workload {name!r} ({what} {target}) cannot be imported: {exc}: install what it needs"
        ) from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's own fault, named in one line
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise RecipeError(
            f"workload {name!r} ({what} {target}) is broken: importing it raised "
            f"{type(exc).__name__}{': ' + first if first else ''}; fix or uninstall the plugin"
        ) from None
    if not isinstance(obj, Workload):
        raise RecipeError(f"workload {name!r} ({what} {target}) is a {type(obj).__name__}, not a dltrain.Workload")
    return obj


def _register_loaded(name: str, obj: Workload, what: str) -> Workload:
    try:
        return register_workload(name, obj)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"workload {name!r} ({what}) cannot be used: {exc}") from None


def get_workload(name: str) -> Workload:
    """The workload a recipe names, imported on first use. RecipeError for an unknown name."""
    from dltrain.workloads import BUILTIN

    if isinstance(name, str) and name in _LOADED:
        return _LOADED[name]
    if isinstance(name, str) and name in BUILTIN:
        return register_workload(name, _load(name, BUILTIN[name], "built in as"))
    eps = _entry_points() if isinstance(name, str) else {}
    if isinstance(name, str) and name in eps:
        what = f"entry point {ENTRY_POINT_GROUP}:"
        return _register_loaded(name, _load(name, eps[name].value, what), what + name)
    raise RecipeError(
        f"unknown workload {shown(name)} at 'workload' (known: {', '.join(workload_names())}); "
        f"a package adds one through the entry-point group '{ENTRY_POINT_GROUP}' or dltrain.register_workload"
    )
