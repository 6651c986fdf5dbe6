"""Everything a workload plugin imports, in one place (see examples/blobs_plugin).

    from dltrain.plugin import (RecipeBase, Section, Workload, DataSplits, Split, Output,
                                classification_output, classification_summary)

The recipe schema:
    RecipeBase      the common recipe sections; subclass it with `workload: Literal["<name>"]` and
                    the workload's own sections
    Section         the base of a recipe section: closed (an unknown key is an error), finite floats
The data:
    DataSplits      train, val and optional test Splits: what build_data returns
    Split           `size` examples and `fetch(indices) -> batch`
The step:
    Output          (loss, stats): what forward returns; the trainer sums the per-example stats
    classification_output(logits, labels) -> Output with per-example "loss" and "correct"
    classification_summary(sums) -> {"loss", "accuracy"} from the summed stats (Workload.summarize)
The workload and its signatures:
    Workload, register_workload, and one Protocol per function a Workload holds (BuildModel,
    BuildData, Forward, FlopsPerSample, Summarize, ...; their docstrings say what each returns).
    `Workload(...)` checks every function against its Protocol when it is built.

Importing this module imports torch (the data and step helpers are torch code); `import dltrain`
alone does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dltrain.data import DataError, DataSplits, Split
from dltrain.recipe import RecipeBase, RecipeError, Section
from dltrain.workload import (
    SIGNATURES,
    BatchSizeOf,
    BuildData,
    BuildModel,
    BuildSplit,
    ComputeDtypes,
    FlopsBatch,
    FlopsOf,
    FlopsPerSample,
    Forward,
    LabelNames,
    Output,
    SaveModel,
    Summarize,
    TokensOf,
    Workload,
    WriteSamples,
    register_workload,
    signature_problem,
)

__all__ = [
    "SIGNATURES",
    "BatchSizeOf",
    "BuildData",
    "BuildModel",
    "BuildSplit",
    "ComputeDtypes",
    "DataError",
    "DataSplits",
    "FlopsBatch",
    "FlopsOf",
    "FlopsPerSample",
    "Forward",
    "LabelNames",
    "Output",
    "RecipeBase",
    "RecipeError",
    "SaveModel",
    "Section",
    "Split",
    "Summarize",
    "TokensOf",
    "Workload",
    "WriteSamples",
    "classification_output",
    "classification_summary",
    "register_workload",
    "signature_problem",
]

# ----------------------------------------------------------------------------------------------
# The step's helpers (the built-in workloads use them too)


def classification_output(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> Output:
    """Cross-entropy for logits (batch, classes) and integer labels: the mean loss, and per example
    "loss" and "correct" (1.0 where the argmax is the label). Computed in fp32 under autocast.
    With `label_smoothing` s > 0 the loss to backpropagate is the cross-entropy against
    (1 - s) x one-hot + s / classes; the per-example "loss" stays the plain cross-entropy, so
    logged and evaluated losses compare across settings."""
    logits = logits.float()
    per_example = F.cross_entropy(logits, labels, reduction="none")
    correct = (logits.argmax(dim=-1) == labels).float()
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if label_smoothing else per_example.mean()
    return Output(loss, {"loss": per_example.detach(), "correct": correct})


def classification_summary(sums: dict[str, float]) -> dict[str, float]:
    """{"loss", "accuracy"} from classification_output's statistics summed over a split (a
    Workload's `summarize`)."""
    count = max(sums.get("count", 0.0), 1.0)
    return {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
