"""An example dltrain workload in a package of its own: an MLP classifying Gaussian blobs.

The data are generated (no download): `data.classes` centres drawn in `data.dim` dimensions,
each example a centre plus Gaussian noise of `data.spread`, all from `data.seed`. Everything dltrain
needs is below, in four parts: the recipe schema, the model, the data, and the `Workload` that
ties them together. `pyproject.toml` declares it in the entry-point group `dltrain.workloads`;
in a notebook, `dltrain.register_workload("blobs", WORKLOAD)` does the same without installing.

Everything imported from dltrain comes from `dltrain.plugin`, which documents it. Each function
follows the Protocol of its Workload field (dltrain.plugin.BuildModel, BuildData, Forward,
FlopsPerSample, Summarize): `Workload(...)` below checks them when the module is imported, and
tests/integration/test_plugin.py checks them too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from dltrain.plugin import (
    DataSplits,
    Output,
    RecipeBase,
    Section,
    Split,
    Workload,
    classification_output,
    classification_summary,
)

# ----------------------------------------------------------------------------------------------
# Recipe schema: the common sections (train, optim, ...) come from RecipeBase; `model` and `data`
# are this workload's. Closed (Section forbids unknown keys): a typo fails at start-up.


class ModelConfig(Section):
    hidden: PositiveInt = 64
    """units per hidden layer"""
    layers: int = Field(2, ge=1, le=16)
    """hidden layers"""


class DataConfig(Section):
    classes: int = Field(3, ge=2, le=1000)
    dim: PositiveInt = 8
    """features per example"""
    num_samples: int = Field(3000, ge=10, le=10_000_000)
    spread: float = Field(1.0, gt=0)
    """noise std around each centre (centres ~ N(0, 3^2))"""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0, lt=2**32)


class Recipe(RecipeBase):
    workload: Literal["blobs"]
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()


# ----------------------------------------------------------------------------------------------
# Model


def build_model(recipe: Recipe) -> nn.Module:
    m, d = recipe.model, recipe.data
    layers, width = [], d.dim
    for _ in range(m.layers):
        layers += [nn.Linear(width, m.hidden), nn.ReLU()]
        width = m.hidden
    return nn.Sequential(*layers, nn.Linear(width, d.classes))


def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Output:
    x, y = batch
    return classification_output(model(x), y)  # mean loss, and per-example loss and correct


def flops_per_sample(recipe: Recipe) -> int:
    """Forward 2 x (weights) multiply-adds, backward twice that."""
    m, d = recipe.model, recipe.data
    widths = [d.dim] + [m.hidden] * m.layers + [d.classes]
    return 3 * sum(2 * a * b for a, b in zip(widths, widths[1:]))


# ----------------------------------------------------------------------------------------------
# Data


def generate(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    centres = 3.0 * torch.randn(cfg.classes, cfg.dim, generator=gen)
    labels = torch.randint(cfg.classes, (cfg.num_samples,), generator=gen)
    features = centres[labels] + cfg.spread * torch.randn(cfg.num_samples, cfg.dim, generator=gen)
    return features, labels


def build_data(recipe: Recipe, device: torch.device | str = "cpu") -> DataSplits:
    x, y = (t.to(device) for t in generate(recipe.data))
    n_val = max(1, int(len(y) * recipe.data.val_fraction))

    def split(lo: int, hi: int) -> Split:
        xs, ys = x[lo:hi], y[lo:hi]
        return Split(hi - lo, lambda idx: (xs[idx.to(xs.device)], ys[idx.to(ys.device)]))

    return DataSplits(train=split(n_val, len(y)), val=split(0, n_val))


# ----------------------------------------------------------------------------------------------
# The workload: what the entry point names

WORKLOAD = Workload(
    recipe=Recipe,
    build_model=build_model,
    build_data=build_data,
    forward=forward,
    flops_per_sample=flops_per_sample,
    summarize=classification_summary,
    metrics=("val/loss", "val/accuracy"),  # recipe validation checks target.metric against these
)
