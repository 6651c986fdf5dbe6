"""Next-value prediction on synthetic sine sequences with a recurrent network (the original report's RNN).

Each sequence is `seq_len + 1` samples of A sin(2 pi f t + phi) (+ Gaussian noise), with amplitude,
frequency and phase drawn per sequence from a generator seeded by `data.seed`; the model reads the
first `seq_len` values and predicts the last one. For scale, the summary also gives the MSE of
the naive "repeat the last value" predictor on the same examples and the ratio between the two.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, FiniteFloat, PositiveInt, model_validator
from torch import nn

from dltrain.data import DataSplits, Split, sized_by
from dltrain.plugin import Output
from dltrain.recipe import RecipeBase, Section
from dltrain.workload import Workload

METRICS = tuple(
    f"{split}/{m}" for split in ("val", "test") for m in ("loss", "mse", "naive_mse", "mse_ratio")
)  # what evaluation reports

# ----------------------------------------------------------------------------------------------
# Config


class ModelConfig(Section):
    cell: Literal["rnn", "lstm", "gru"] = "rnn"
    hidden: PositiveInt = 32
    """units per recurrent layer"""
    layers: PositiveInt = 1


def split_sizes(cfg: DataConfig) -> tuple[int, int, int]:
    """Sequences in train, validation and test (DataConfig's validator needs it first)."""
    n_train = int(round(cfg.num_sequences * cfg.train_fraction))
    n_val = int(round(cfg.num_sequences * cfg.val_fraction))
    return n_train, n_val, cfg.num_sequences - n_train - n_val


class DataConfig(Section):
    seed: int = Field(0, ge=-(2**63), lt=2**64)
    """The data are a function of this seed alone, whatever train.seed is; torch.Generator's range."""
    num_sequences: PositiveInt = 1000
    seq_len: PositiveInt = 10
    """inputs per sequence; the target is the value after them"""
    train_fraction: float = Field(0.70, gt=0, lt=1)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """the rest is the test split"""
    amplitude: tuple[FiniteFloat, FiniteFloat] = (0.5, 1.5)
    """uniform range"""
    frequency: tuple[FiniteFloat, FiniteFloat] = (0.02, 0.2)
    """cycles per time step, uniform range"""
    noise: FiniteFloat = Field(0.0, ge=0)
    """std of Gaussian noise added to every value"""

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError("data.train_fraction + data.val_fraction must leave some sequences for the test split")
        for name in ("amplitude", "frequency"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"data.{name} must be a range [low, high] with 0 <= low <= high")
        # An empty split would leave evaluation nothing to average: refuse it here, naming the keys.
        n_train, n_val, n_test = split_sizes(self)
        for n, split, key in ((n_train, "train", "train_fraction"), (n_val, "validation", "val_fraction")):
            if n == 0:
                raise ValueError(
                    f"data.num_sequences={self.num_sequences} x data.{key}={getattr(self, key)} "
                    f"leaves the {split} split empty: raise either"
                )
        if n_test < 1:
            raise ValueError(
                f"data.num_sequences={self.num_sequences} leaves no sequence for the test split after "
                "data.train_fraction and data.val_fraction: raise it or lower them"
            )
        return self


class Recipe(RecipeBase):
    workload: Literal["rnn"]
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()


# ----------------------------------------------------------------------------------------------
# Model

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # weight matrices per layer, for the FLOP count


class SeqRegressor(nn.Module):
    """A recurrent stack over the sequence, then a linear layer from the last hidden state to one value."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rnn = _CELLS[cfg.cell](input_size=1, hidden_size=cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 1] -> [B]
        if recurrent_in_fp32(x.device.type):
            with torch.autocast("cuda", enabled=False):
                out, _ = self.rnn(x.float())
        else:
            out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def recurrent_in_fp32(device_type: str) -> bool:
    """cuDNN's RNN under CUDA autocast computes in fp16 whatever dtype autocast was given (torch
    casts its inputs and weights to half): a "bf16" run would be fp16 without a loss scaler. Under
    bf16 autocast the recurrent layers therefore run outside it, in fp32, and the summary says so
    (`compute_dtypes`); fp16 autocast keeps cuDNN's fp16, which is what it asked for."""
    return (
        device_type == "cuda"
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") != torch.float16
    )


def compute_dtypes(recipe: Recipe, device_type: str) -> dict[str, str]:
    """What each part of the model computes in, where it differs from train.precision."""
    if device_type == "cuda" and recipe.train.precision == "bf16":
        return {"recurrent layers": "fp32 (cuDNN's RNN would run fp16 under bf16 autocast)", "head": "bf16"}
    return {}


def build_model(recipe: Recipe) -> nn.Module:
    with sized_by("the model", "model.hidden or model.layers"):
        return SeqRegressor(recipe.model)


def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Output:
    x, y = batch
    pred = model(x).float()
    # The wrapped module's mode: a DeepSpeed engine put in evaluation mode switches only the module
    # inside it; its own `training` flag stays True. Training: the trainer logs the mean loss itself.
    if getattr(model, "module", model).training:
        return Output(F.mse_loss(pred, y), {})
    # Evaluation: per-example errors, and those of "repeat the last value", a property of the
    # data reported next to the model's.
    stats = {"loss": (pred.detach() - y).square(), "naive_loss": (x[:, -1, 0] - y).square()}
    return Output(stats["loss"].mean(), stats)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums.get("count", 0.0), 1.0)
    mse = sums["loss"] / count
    if "naive_loss" not in sums:  # training windows
        return {"loss": mse, "mse": mse}
    naive = sums["naive_loss"] / count
    return {"loss": mse, "mse": mse, "naive_mse": naive, "mse_ratio": mse / naive if naive > 0 else math.nan}


def batch_size_of(batch) -> int:
    return len(batch[1])


def flops_per_sample(recipe: Recipe) -> int:
    """Training FLOPs per sequence: at each of T steps and each layer, g gate matmuls
    (g = 1 rnn, 3 gru, 4 lstm) of 2 (in + h) h FLOPs, plus the head's 2 h once; backward counted
    as twice the forward. Elementwise gate arithmetic is left out (small next to the matmuls)."""
    m, T = recipe.model, recipe.data.seq_len
    g = _GATES[m.cell]
    per_step = sum(2 * g * ((1 if layer == 0 else m.hidden) + m.hidden) * m.hidden for layer in range(m.layers))
    return 3 * (T * per_step + 2 * m.hidden)


# ----------------------------------------------------------------------------------------------
# Data


def generate(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, seq_len, 1] and next-value targets [N], float32, the same for the same config."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.num_sequences

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)

    amplitude, frequency = uniform(*cfg.amplitude), uniform(*cfg.frequency)
    phase = uniform(0.0, 2 * math.pi)
    t = torch.arange(cfg.seq_len + 1, dtype=torch.float64)
    values = amplitude * torch.sin(2 * math.pi * frequency * t + phase)
    if cfg.noise:
        values = values + cfg.noise * torch.randn(values.shape, generator=gen, dtype=torch.float64)
    values = values.float()
    return values[:, :-1].unsqueeze(-1), values[:, -1]


def build_data(recipe: Recipe, device: torch.device | str = "cpu") -> DataSplits:
    with sized_by("the sequences", "data.num_sequences or data.seq_len"):
        x, y = generate(recipe.data)
    x, y = x.to(device), y.to(device)
    n_train, n_val, _ = split_sizes(recipe.data)
    # The sequences are drawn independently, so consecutive slices are random splits.
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(y))}

    def split(lo: int, hi: int) -> Split:
        xs, ys = x[lo:hi], y[lo:hi]

        def fetch(idx: torch.Tensor):
            if idx.device != xs.device:  # the loop's indices live where the data does: no copy per step
                idx = idx.to(xs.device)
            return xs[idx], ys[idx]

        return Split(hi - lo, fetch)

    return DataSplits(**{name: split(lo, hi) for name, (lo, hi) in bounds.items()})


def write_samples(recipe: Recipe, out_dir: Path, n: int = 12) -> list[Path]:
    """For `dltrain inspect`: a grid of input sequences, each with its target value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = generate(recipe.data)
    n = min(n, len(y))
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    T = recipe.data.seq_len
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.plot(range(T), x[i, :, 0].numpy(), "o-", ms=3, label="input")
        ax.plot([T], [y[i].item()], "r*", ms=9, label="target")
        ax.set_title(f"#{i}: target {y[i].item():+.3f}", fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{recipe.name}: {n} of {len(y)} sequences (seed {recipe.data.seed})")
    fig.tight_layout()
    path = out_dir / "samples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------
# What the registry hands the trainer, `inspect` and the bench harness (dltrain.workload)

WORKLOAD = Workload(
    recipe=Recipe,
    build_model=build_model,
    build_data=build_data,
    forward=forward,
    summarize=summarize,
    batch_size_of=batch_size_of,
    flops_per_sample=flops_per_sample,
    metrics=METRICS,
    write_samples=write_samples,
    baselines={"bare": "rnn_bare.py"},
    compute_dtypes=compute_dtypes,
)
