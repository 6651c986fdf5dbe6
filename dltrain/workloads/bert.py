"""BERT-family sequence classification on SST-2 (or any text/label TSV/CSV), via transformers.

Data path: rows are read with `datasets` (local GLUE TSV under the data root, the hub's
`nyu-mll/glue`/`sst2` when online, or the user's own files), tokenized once with the model's
tokenizer and saved with `save_to_disk` under `dltrain.data.cache_dir()`; later runs load that
copy. `build_data` then pads every text to max_length once, into tensors on the training device
(`TokenSplit`), and a batch is a slice of them: no tokenizer call and no host-to-device copy per
step, and the index-based sharding in dltrain.data works unchanged.

Model path: `model.name_or_path` is a local directory or a hub id. A hub id also resolves to
`$DLTRAIN_MODELS_DIR/<id>` or `$DLTRAIN_MODELS_DIR/<last part of the id>` when such a folder
exists (so `sentence-transformers/all-MiniLM-L6-v2` finds `$DLTRAIN_MODELS_DIR/all-MiniLM-L6-v2`
offline).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from dltrain.data import DataError, DataSplits, Split, cache_dir, data_root
from dltrain.recipe import RecipeBase, Section
from dltrain.workloads.common import Output, classification_output

# ----------------------------------------------------------------------------------------------
# Config


class ModelConfig(Section):
    name_or_path: str = "bert-base-uncased"  # hub id or local directory (see module docstring)
    tokenizer: str | None = Field(None, description="hub id or directory; default: name_or_path")
    init: Literal["pretrained", "random"] = "pretrained"  # random: architecture from the config alone
    num_labels: PositiveInt = 2


class DataConfig(Section):
    root: str | None = Field(None, description="folder holding sst2/{train,dev}.tsv; default $DLTRAIN_DATA_DIR")
    train_file: str | None = Field(None, description="own TSV/CSV file instead of SST-2 (needs eval_file)")
    eval_file: str | None = None
    test_file: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    max_length: PositiveInt = 128  # tokens, truncating longer texts, as the original
    # dynamic: each micro-batch padded to its longest text (least work in eager mode); fixed: always
    # to max_length (one shape); bucket: the longest text rounded up to a multiple of
    # bucket_multiple, capped at max_length (a few shapes, so torch.compile compiles a few graphs;
    # in eager mode it costs 1.4x dynamic's step time: MiniLM, SST-2, batch 16, 1 CPU thread).
    padding: Literal["dynamic", "fixed", "bucket"] = "dynamic"
    bucket_multiple: PositiveInt = 32  # tokens; padding: bucket only
    train_subset: PositiveInt | None = Field(None, description="use this many train rows, drawn by train.seed")
    eval_subset: PositiveInt | None = Field(None, description="use this many eval rows, drawn by train.seed")


class Recipe(RecipeBase):
    workload: Literal["bert"]
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()


# ----------------------------------------------------------------------------------------------
# Model

# Configs that must be buildable with no network and no files, for random-init throughput runs.
# transformers' BertConfig() defaults are exactly bert-base-uncased's (12 layers, hidden 768,
# 12 heads, intermediate 3072, 512 positions, vocab 30,522).
_BUILTIN_CONFIGS = {"bert-base-uncased": {}, "google-bert/bert-base-uncased": {}}

_HOW_TO_MODEL = (
    "download it while online, or put its files in a local directory and set model.name_or_path "
    "(and model.tokenizer) to it, or set DLTRAIN_MODELS_DIR to a folder holding {short}/"
)


def resolve(name: str) -> str:
    """A local directory for `name` if there is one, else `name` itself (a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    models = os.environ.get("DLTRAIN_MODELS_DIR")
    if models:
        for candidate in (Path(models) / name, Path(models) / name.split("/")[-1]):
            if candidate.is_dir():
                return str(candidate)
    return name


def _load_error(what: str, name: str, exc: Exception) -> DataError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    how = _HOW_TO_MODEL.format(short=name.split("/")[-1])
    return DataError(f"cannot load {what} {name!r} ({reason[:200]}): {how}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer", name, exc) from None


def tokenizer_for(recipe: Recipe):
    return load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)


def model_config(cfg: ModelConfig):
    from transformers import AutoConfig, BertConfig

    if cfg.name_or_path in _BUILTIN_CONFIGS and resolve(cfg.name_or_path) == cfg.name_or_path:
        return BertConfig(num_labels=cfg.num_labels, **_BUILTIN_CONFIGS[cfg.name_or_path])
    try:
        return AutoConfig.from_pretrained(resolve(cfg.name_or_path), num_labels=cfg.num_labels)
    except (OSError, ValueError) as exc:
        raise _load_error("model config", cfg.name_or_path, exc) from None


def build_model(recipe: Recipe) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    cfg = recipe.model
    if cfg.init == "random":
        return AutoModelForSequenceClassification.from_config(model_config(cfg), attn_implementation="sdpa")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve(cfg.name_or_path), num_labels=cfg.num_labels,
                                                                  attn_implementation="sdpa")  # forward() relies on it
    except (OSError, ValueError) as exc:
        raise _load_error("model", cfg.name_or_path, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def forward(model: nn.Module, batch: dict) -> Output:
    mask = batch["attention_mask"]
    # The mask goes in as [B, 1, 1, T] bool (True: attend), which transformers passes to SDPA as it
    # is. Given the 2D mask, it first asks whether anything is padded (`padding_mask.all()` in
    # masking_utils._ignore_bidirectional_mask_sdpa), a host read that stalls every step on a GPU.
    # The values are those it would build; a bool mask suits SDPA only, hence build_model's choice.
    logits = model(input_ids=batch["input_ids"], attention_mask=mask[:, None, None, :].bool()).logits
    out = classification_output(logits, batch["labels"])
    # Tokens per example, real and as padded: tokens/s, padded tokens/s and FLOPs (flops_of).
    out.stats["tokens"] = mask.sum(dim=1).float()
    out.stats["padded_tokens"] = torch.full_like(out.stats["tokens"], mask.shape[1])
    return out


def summarize(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}
    if "tokens" in sums:
        out["tokens_per_example"] = sums["tokens"] / count
        out["padded_tokens_per_example"] = sums["padded_tokens"] / count
    return out


def batch_size_of(batch) -> int:
    return len(batch["labels"])


def flops_per_token(config, seq_len: float) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 N + 12 L d T, where N counts the weights of the
    encoder layers, pooler and classifier (embeddings are lookups, not matmuls), L layers, d the
    hidden size, T the sequence length (the 12 L d T term is QK^T and attention x V, forward and
    backward)."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * d * d + 2 * d * ff  # Q, K, V, output projections; two feed-forward matmuls
    n = L * per_layer + d * d + d * config.num_labels  # + pooler + classifier
    return 6 * n + 12 * L * d * seq_len


@functools.lru_cache(maxsize=8)
def _cached_config(name_or_path: str, num_labels: int):
    """model_config once per model: flops_of runs at every log record."""
    return model_config(ModelConfig(name_or_path=name_or_path, num_labels=num_labels))


def flops_per_sample(recipe: Recipe) -> int:
    """flops_per_token x T with T = data.max_length, i.e. every example padded to max_length as in
    the original. With dynamic or bucket padding the work done is smaller: see flops_of."""
    T = recipe.data.max_length
    return T * flops_per_token(_cached_config(recipe.model.name_or_path, recipe.model.num_labels), T)


def flops_of(recipe: Recipe, sums: dict[str, float]) -> dict[str, float]:
    """Training FLOPs of a logged window from its summed per-example statistics (`count`,
    `tokens`, `padded_tokens`): "flops" counts the padded tokens (the work done), "flops_real"
    the real ones (the work a padding-free run would do).

    Approximation: the attention term grows with T^2 per example; taking each basis's mean length
    T_mean for all examples gives tokens x flops_per_token(T_mean) = 6 N tokens + 12 L d
    (sum T)^2 / count, which is exact when every example has the same T (fixed padding, or one
    micro-batch's padded length) and otherwise under-counts attention by 12 L d count var(T).
    """
    count = sums.get("count", 0.0)
    if count <= 0:
        return {"flops": 0.0, "flops_real": 0.0}
    config = _cached_config(recipe.model.name_or_path, recipe.model.num_labels)
    padded, real = sums["padded_tokens"], sums["tokens"]
    return {"flops": padded * flops_per_token(config, padded / count),
            "flops_real": real * flops_per_token(config, real / count)}


def save_model(model: nn.Module, state_dict: dict, out_dir: Path, recipe: Recipe) -> None:
    """Hugging Face format: `from_pretrained(out_dir)` loads model and tokenizer back."""
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer_for(recipe).save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------
# Data

TOKENIZE_CALLS = 0  # how many splits were tokenized (not loaded from the cache) in this process
_CACHE_VERSION = 1  # bump when the tokenized format changes
_HOW_TO_DATA = (
    "put GLUE's SST-2 train.tsv and dev.tsv in <root>/sst2/ and point data.root or DLTRAIN_DATA_DIR at "
    "<root>, or give data.train_file and data.eval_file"
)


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DLTRAIN_OFFLINE"))


def _source_files(cfg: DataConfig) -> dict[str, Path] | None:
    """split -> file, or None to use the hub. Raises DataError when nothing usable is found."""
    if cfg.train_file or cfg.eval_file:
        if not (cfg.train_file and cfg.eval_file):
            raise DataError("data.train_file and data.eval_file go together: give both (eval_file is the validation set)")
        files = {"train": cfg.train_file, "val": cfg.eval_file} | ({"test": cfg.test_file} if cfg.test_file else {})
        files = {k: Path(v).expanduser() for k, v in files.items()}
        for key, path in files.items():
            if not path.is_file():
                raise DataError(f"data file not found: {path} (data.{'eval' if key == 'val' else key}_file)")
        return files
    sst2 = data_root(cfg.root) / "sst2"
    if (sst2 / "train.tsv").is_file() and (sst2 / "dev.tsv").is_file():
        return {"train": sst2 / "train.tsv", "val": sst2 / "dev.tsv"}
    if _offline():
        raise DataError(f"SST-2 not found in {sst2} and downloads are off (offline mode): {_HOW_TO_DATA}")
    return None


def _read_file(path: Path):
    from datasets import load_dataset

    tsv = path.suffix.lower() in (".tsv", ".tab", ".txt")
    try:
        # QUOTE_NONE for TSV: GLUE text holds bare quote characters; keep_default_na=False keeps a
        # text such as "null" or "nan" a string.
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
        return load_dataset("csv", data_files=str(path), split="train", keep_default_na=False,
                            cache_dir=str(cache_dir() / "hf_datasets"), **kwargs)
    except Exception as exc:  # pandas and pyarrow raise many types for malformed files
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header only
            raise DataError(f"{path}: no rows (the file holds a header only): give a file with examples") from None
        raise DataError(f"cannot read {path} as {'TSV' if tsv else 'CSV'} ({str(exc).splitlines()[0][:200]})") from None


def _read_hub(split: str):
    from datasets import load_dataset

    try:
        return load_dataset("nyu-mll/glue", "sst2", split=split, cache_dir=str(cache_dir() / "hf_datasets"))
    except Exception as exc:
        raise DataError(f"SST-2 download from the hub failed ({str(exc).splitlines()[0][:200]}): {_HOW_TO_DATA}") from None


def _check(ds, cfg: DataConfig, where: str):
    """Rows with a text and a 0/1 label, or a DataError that says what to change."""
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_column and data.label_column"
        )
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    labels = set(ds.unique(cfg.label_column))
    if not labels <= {0, 1}:
        shown = ", ".join(repr(v) for v in sorted(labels, key=str)[:5])
        raise DataError(f"{where}: labels must be 0 or 1 (binary classification), found {shown}")
    return ds


def _cache_key(source: str, cfg: DataConfig, tokenizer) -> str:
    ident = {
        "source": source, "text": cfg.text_column, "label": cfg.label_column, "max_length": cfg.max_length,
        "tokenizer": [tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer)], "v": _CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _file_ident(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def tokenized_split(read, source: str, cfg: DataConfig, tokenizer, where: str):
    """A datasets.Dataset with input_ids and labels, from the cache or tokenized now and cached.

    Several processes may start together: the main process goes first and writes the cache
    (atomically, by renaming a finished folder), the others then load it.
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    global TOKENIZE_CALLS
    target = cache_dir() / "tokenized" / _cache_key(source, cfg, tokenizer)
    with PartialState().main_process_first():
        if target.is_dir():
            return load_from_disk(str(target))
        ds = _check(read(), cfg, where)
        TOKENIZE_CALLS += 1
        ds = ds.map(
            lambda rows: tokenizer(rows[cfg.text_column], truncation=True, max_length=cfg.max_length)
            | {"labels": rows[cfg.label_column]},
            batched=True, remove_columns=ds.column_names, desc=f"tokenizing {where}",
        )
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        ds.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(target))


class TokenSplit(Split):
    """A split's token ids padded once to max_length, as tensors on the training device: a batch is
    `ids[idx, :T]`, its mask `positions < lengths[idx]`, its labels `labels[idx]`; the values
    `tokenizer.pad` gives for the same rows and T (BERT pads on the right).

    T is a shape, so the host must know it, yet it depends on the rows' lengths, which live on the
    device. `batches` therefore takes all of a call's index tensors at once (one epoch of training,
    one evaluation), computes every micro-batch's T on the device and reads them back in one
    `.tolist()` (none for fixed padding): one host read per call instead of one per step.
    """

    def __init__(self, table, pad_id: int, cfg: DataConfig, device):
        # Through Arrow, not Python lists: 15 ms for SST-2's 67k texts, against 0.8 s.
        column = table.column("input_ids").combine_chunks()
        lengths, flat = _long(column.value_lengths()), _long(column.flatten())
        ids = torch.full((len(lengths), cfg.max_length), pad_id, dtype=torch.long)
        ids[torch.arange(cfg.max_length) < lengths[:, None]] = flat  # row by row, left-aligned
        super().__init__(len(lengths), self.fetch_one)
        self.ids, self.lengths = ids.to(device), lengths.to(device)
        self.labels = _long(table.column("labels")).to(device)
        self.positions = torch.arange(cfg.max_length, device=device)
        self.padding, self.max_length, self.multiple = cfg.padding, cfg.max_length, cfg.bucket_multiple

    def batches(self, index_batches):
        index_batches = list(index_batches)  # slices of one permutation: cheap to hold
        if not index_batches:
            return
        sizes = [len(idx) for idx in index_batches]  # the last evaluation batch may be shorter
        rows = torch.cat(index_batches).to(self.ids.device)  # one copy per call if they come from the host
        for idx, T in zip(rows.split(sizes), self.padded_lengths(rows, sizes)):
            yield {"input_ids": self.ids[idx, :T], "attention_mask": (self.positions[:T] < self.lengths[idx, None]).long(),
                   "labels": self.labels[idx]}

    def padded_lengths(self, rows: torch.Tensor, sizes: list[int]) -> list[int]:
        """T of each micro-batch (`sizes` consecutive rows each), from a single host read."""
        if self.padding == "fixed":
            return [self.max_length] * len(sizes)
        which = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(rows.device)
        longest = torch.zeros(len(sizes), dtype=torch.long, device=rows.device)
        longest.scatter_reduce_(0, which, self.lengths[rows], reduce="amax")
        if self.padding == "bucket":
            longest = ((longest + self.multiple - 1) // self.multiple * self.multiple).clamp_(max=self.max_length)
        return longest.tolist()

    def fetch_one(self, idx: torch.Tensor) -> dict:
        """One batch (inspect, benchmarks): one host read of its own."""
        return next(self.batches([idx]))


def _long(arrow_array) -> torch.Tensor:
    # A copy: Arrow's memory is read-only.
    return torch.tensor(arrow_array.to_numpy(zero_copy_only=False), dtype=torch.long)


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return ds.select(sorted(order.tolist()))


def load_splits(recipe: Recipe) -> dict:
    """split name -> tokenized datasets.Dataset (train, val, and test for user files that have one)."""
    cfg, tokenizer = recipe.data, tokenizer_for(recipe)
    files = _source_files(cfg)
    out = {}
    if files is None:
        for split, hub_split in (("train", "train"), ("val", "validation")):
            out[split] = tokenized_split(functools.partial(_read_hub, hub_split), f"hub:nyu-mll/glue/sst2/{hub_split}",
                                         cfg, tokenizer, f"SST-2 {hub_split}")
    else:
        for split, path in files.items():
            out[split] = tokenized_split(functools.partial(_read_file, path), _file_ident(path), cfg, tokenizer, str(path))
    out["train"] = _subset(out["train"], cfg.train_subset, recipe.train.seed)
    out["val"] = _subset(out["val"], cfg.eval_subset, recipe.train.seed)
    return out


def build_data(recipe: Recipe, device: torch.device | str = "cpu") -> DataSplits:
    pad_id = tokenizer_for(recipe).pad_token_id
    splits = {k: TokenSplit(ds.with_format("arrow")[:], pad_id, recipe.data, device)  # the rows a subset selects
              for k, ds in load_splits(recipe).items()}
    return DataSplits(train=splits["train"], val=splits["val"], test=splits.get("test"))


def write_samples(recipe: Recipe, out_dir: Path, n: int = 12) -> list[Path]:
    """For `dltrain inspect`: validation texts as the model sees them (decoded token ids), with labels."""
    tokenizer = tokenizer_for(recipe)
    ds = load_splits(recipe)["val"]
    rows = ds.select(range(min(n, len(ds))))
    lines = [f"# {recipe.name}: {len(rows)} of {len(ds)} validation examples", "",
             "| # | label | tokens | text (decoded from the token ids) |", "| ---: | ---: | ---: | --- |"]
    for i, (ids, label) in enumerate(zip(rows["input_ids"], rows["labels"])):
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("|", "\\|")
        lines.append(f"| {i} | {label} | {len(ids)} | {text} |")
    path = out_dir / "samples.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
