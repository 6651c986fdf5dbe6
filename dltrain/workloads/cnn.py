"""The MNIST CNN of the original report: two conv blocks and two linear layers."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, FiniteFloat, PositiveInt
from torch import nn

from dltrain.data import DataError, DataSplits, Split, cache_dir, data_root, say, sized_by
from dltrain.plugin import Output, classification_output, classification_summary
from dltrain.recipe import LocalPath, RecipeBase, Section
from dltrain.workload import Workload

METRICS = (
    "val/loss",
    "val/accuracy",
    "test/loss",
    "test/accuracy",
)  # what evaluation reports (recipe.validate checks target.metric)
REQUIRES = {"torchvision": "vision"}  # module -> the pip extra that installs it (dltrain.extras)

# ----------------------------------------------------------------------------------------------
# Config


class ModelConfig(Section):
    conv1_channels: PositiveInt = 32
    conv2_channels: PositiveInt = 64
    hidden: PositiveInt = 128
    """width of the first linear layer"""
    num_classes: int = Field(10, ge=10)
    """logits; MNIST's labels are 0-9, so at least 10"""
    channels_last: bool = False
    """hold the conv weights, and so the activations, in channels_last (NHWC) memory format: the
    same model and numbers up to reduction order, faster oneDNN convolutions and max-pooling on CPU
    (issue 24: 1.38 +- 0.09x samples/s at batch 128 on one AVX2 thread, suites/cnn_layout.yaml).
    The 1-channel images need no change (NCHW and NHWC are the same bytes); checkpoints and exports
    are written contiguous."""
    pool_before_relu: bool = False
    """max-pool, then ReLU, in each conv block: the same function and gradients bit for bit (ReLU is
    monotone, so it commutes with max), the same parameters and state_dict keys, with the ReLU and
    its backward on a quarter of the elements (issue 24: 1.12 +- 0.12x samples/s over channels_last
    at batch 128 on one AVX2 thread)"""


class DataConfig(Section):
    root: LocalPath | None = None
    """folder holding MNIST/raw; default $DLTRAIN_DATA_DIR"""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """share of train held out, by seed"""
    loader: Literal["tensor", "torch"] = "tensor"
    """in-memory indexing, or torchvision DataLoader"""
    num_workers: int = Field(0, ge=0, le=64)
    """DataLoader worker processes (loader: torch only); each one imports torch, hence a ceiling."""
    mean: FiniteFloat = 0.5
    """normalization as the original notebook: (x - 0.5) / 0.5"""
    std: FiniteFloat = Field(0.5, gt=0)
    train_subset: PositiveInt | None = None
    """use only this many train examples"""


class LossConfig(Section):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """training loss only: cross-entropy against (1 - s) x one-hot + s / classes (issue 24's record
    profile); logged and evaluated losses stay the plain cross-entropy"""


class Recipe(RecipeBase):
    workload: Literal["cnn"]
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()


# ----------------------------------------------------------------------------------------------
# Model


class Net(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1, c2 = cfg.conv1_channels, cfg.conv2_channels

        def act_pool() -> list[nn.Module]:  # 2x2 max-pool halves each side: 28 -> 14 -> 7
            layers = [nn.ReLU(), nn.MaxPool2d(2)]
            return layers[::-1] if cfg.pool_before_relu else layers

        # The convolutions stay at features.0 and features.3 in either order: one state_dict.
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), *act_pool(), nn.Conv2d(c1, c2, 3, padding=1), *act_pool()
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 7 * 7, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(recipe: Recipe) -> nn.Module:
    with sized_by("the model", "model.conv1_channels, model.conv2_channels or model.hidden"):
        model = Net(recipe.model)
    if recipe.model.channels_last:
        # Parameters keep these strides through .to(device), load_state_dict (a copy into them) and
        # the optimizer's state (zeros_like preserves the format); state_dict() hands them out
        # non-contiguous, which the savers (Accelerate's save_state, dltrain.export) make contiguous.
        model = model.to(memory_format=torch.channels_last)
    # A plain attribute, not a buffer: not in the state_dict, read by `forward` in training mode.
    model.label_smoothing = recipe.loss.label_smoothing
    return model


def forward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Output:
    images, labels = batch
    # DDP and DeepSpeed wrap the Net as `.module`; a compiled module forwards attribute reads.
    smoothing = getattr(getattr(model, "module", model), "label_smoothing", 0.0) if model.training else 0.0
    return classification_output(model(images), labels, smoothing)


summarize = classification_summary


def label_names(recipe: Recipe) -> list[str]:
    """Class names by index, for exported configs (id2label): the digits."""
    return [str(i) for i in range(recipe.model.num_classes)]


def batch_size_of(batch) -> int:
    return len(batch[1])


def flops_per_sample(recipe: Recipe) -> int:
    """Training FLOPs per image: forward, plus backward at twice the forward cost, except that the
    first conv needs no gradient with respect to its input (the images)."""
    m = recipe.model
    conv1 = 2 * 28 * 28 * m.conv1_channels * 9
    conv2 = 2 * 14 * 14 * m.conv2_channels * m.conv1_channels * 9
    fc = 2 * (m.conv2_channels * 49 * m.hidden + m.hidden * m.num_classes)
    forward_flops = conv1 + conv2 + fc
    return 3 * forward_flops - conv1


# ----------------------------------------------------------------------------------------------
# Data

_FILES = {  # name -> (md5 of the .gz, as torchvision checks them; bytes unzipped)
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 47_040_016),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 60_008),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 7_840_016),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 10_008),
}
_HOW_TO = "put the four MNIST .gz files in <root>/MNIST/raw/ and point data.root or DLTRAIN_DATA_DIR at <root>"


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "DLTRAIN_OFFLINE"))


def prepare_mnist(root: Path) -> Path:
    """Return a root whose MNIST/raw holds the four unzipped files, checking what we find.

    A root that holds MNIST files is the one used: unzipped files as they are (read_mnist checks
    them), .gz files checked against their MD5 every time and unzipped into the user cache (the
    data root is never written to: CI's is read-only). Only a root with no MNIST file at all falls
    back to the cache's copy, saying so, or, when online, to a download into the cache.
    """
    raw = root / "MNIST" / "raw"
    plain = [name for name in _FILES if (raw / name).is_file()]
    zipped = [name for name in _FILES if (raw / f"{name}.gz").is_file()]
    if len(plain) == len(_FILES):
        return root
    cached = cache_dir() / "data"
    target = cached / "MNIST" / "raw"
    if len(zipped) == len(_FILES):
        _unzip_checked(raw, target)
        return cached
    if plain or zipped:  # some files: the user meant this root, so never swap in another copy
        missing = [name for name in _FILES if name not in plain and name not in zipped]
        if missing:
            raise DataError(f"MNIST in {raw} is incomplete: {missing[0]}(.gz) is missing; {_HOW_TO}")
        raise DataError(
            f"MNIST in {raw} holds some files unzipped and others as .gz: give all four in one form; {_HOW_TO}"
        )
    if raw.resolve() != target.resolve() and all(_unzipped_ok(target / name) for name in _FILES):
        say("note", f"no MNIST files in {raw}: using the copy in {target}")
        return cached
    if _offline():
        raise DataError(f"MNIST not found in {raw} and downloads are off (offline mode): {_HOW_TO}")
    return _download(cached, raw)


def _unzipped_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == _FILES[path.name][1]


def _unzip_checked(raw: Path, target: Path) -> None:
    """Check the four .gz in `raw` and unzip into `target` those it lacks. A copy unzipped earlier,
    from this root or another, is kept: its .gz had the same MD5, so it holds the same bytes."""
    from torchvision.datasets.utils import check_integrity

    for name, (md5, _) in _FILES.items():
        if not check_integrity(str(raw / f"{name}.gz"), md5):
            raise DataError(f"MNIST file {raw / name}.gz is corrupt (MD5 mismatch): replace it; {_HOW_TO}")
        if _unzipped_ok(target / name):
            continue
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{name}.{os.getpid()}.tmp"
        with gzip.open(raw / f"{name}.gz", "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target / name)  # atomic: concurrent ranks never see half a file


def _download(root: Path, looked_in: Path) -> Path:
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"MNIST not found in {looked_in} and download failed ({exc}): {_HOW_TO}") from None
    return root


def read_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N]."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = "train" if train else "t10k"
    raw = root / "MNIST" / "raw"
    try:
        images = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))
        labels = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    except Exception as exc:
        raise DataError(f"MNIST files in {raw} cannot be read ({exc}): delete them; {_HOW_TO}") from None
    if len(images) != len(labels):
        raise DataError(f"MNIST files in {raw} disagree: {len(images)} images, {len(labels)} labels; {_HOW_TO}")
    return images, labels.long()


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


class _TensorFetch:
    """Batches by indexing uint8 tensors held on the training device."""

    def __init__(self, images, labels, ids, cfg: DataConfig, device):
        self.images = images[ids].to(device)
        self.labels = labels[ids].to(device)
        self.mean, self.std, self.device = cfg.mean, cfg.std, device

    def __call__(self, idx: torch.Tensor):
        idx = idx.to(self.device)
        x = self.images[idx].unsqueeze(1).float().div_(255.0).sub_(self.mean).div_(self.std)
        return x, self.labels[idx]


class TorchLoaderSplit(Split):
    """The classic pipeline: torchvision MNIST -> PIL -> ToTensor -> Normalize, via a DataLoader."""

    def __init__(self, root: Path, train: bool, ids: torch.Tensor, cfg: DataConfig, device):
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((cfg.mean,), (cfg.std,))])
        self.dataset = torch.utils.data.Subset(datasets.MNIST(str(root), train=train, transform=tf), ids.tolist())
        self.num_workers, self.device = cfg.num_workers, device
        super().__init__(len(ids), fetch=None)

    def batches(self, index_batches):
        # An asynchronous copy needs page-locked memory: from pageable memory `non_blocking=True`
        # still waits for the copy. So the loader pins its batches when they go to a GPU.
        pin = torch.device(self.device).type == "cuda"
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx in index_batches],
            num_workers=self.num_workers,
            pin_memory=pin,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


def build_data(recipe: Recipe, device: torch.device | str = "cpu") -> DataSplits:
    cfg = recipe.data
    root = prepare_mnist(data_root(cfg.root))
    train_x, train_y = read_mnist(root, train=True)
    test_x, test_y = read_mnist(root, train=False)
    train_ids, val_ids = split_train_val(len(train_x), cfg.val_fraction, recipe.train.seed)
    if len(val_ids) == 0:  # evaluation would have nothing to average
        raise DataError(
            f"data.val_fraction={cfg.val_fraction} holds out no image of the {len(train_x):,} in the train "
            f"set: raise it to {1 / len(train_x):.1e} or more"
        )
    if cfg.train_subset:
        train_ids = train_ids[: cfg.train_subset]
    test_ids = torch.arange(len(test_x))

    def split(images, labels, ids, train):
        if cfg.loader == "torch":
            return TorchLoaderSplit(root, train, ids, cfg, device)
        return Split(len(ids), _TensorFetch(images, labels, ids, cfg, device))

    return DataSplits(
        train=split(train_x, train_y, train_ids, True),
        val=split(train_x, train_y, val_ids, True),
        test=split(test_x, test_y, test_ids, False),
    )


def sample_inputs(recipe: Recipe, n: int = 16):
    """(images [n, 28, 28] uint8, labels) for `dltrain inspect`."""
    root = prepare_mnist(data_root(recipe.data.root))
    images, labels = read_mnist(root, train=True)
    return images[:n], labels[:n]


def write_samples(recipe: Recipe, out_dir: Path, n: int = 16) -> list[Path]:
    """For `dltrain inspect`: a grid of the first train digits with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = sample_inputs(recipe, n)
    cols = 8
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(labels):
            ax.imshow(images[i].numpy(), cmap="gray")
            ax.set_title(f"label {labels[i].item()}", fontsize=8)
    fig.tight_layout()
    path = out_dir / "samples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------
# What the registry hands the trainer, `inspect` and the bench harness (dltrain.workload)

WORKLOAD = Workload(
    requires=REQUIRES,
    recipe=Recipe,
    build_model=build_model,
    build_data=build_data,
    forward=forward,
    summarize=summarize,
    batch_size_of=batch_size_of,
    flops_per_sample=flops_per_sample,
    metrics=METRICS,
    write_samples=write_samples,
    label_names=label_names,
    # The bare loop builds the default MNIST recipe itself: it takes no --recipe.
    baselines={"bare": "cnn_bare.py"},
    baseline_takes_recipe=False,
    # The original notebook: the same model and loop fed by torchvision's DataLoader pipeline.
    bench_variants={"notebook": ["data.loader=torch"]},
)
