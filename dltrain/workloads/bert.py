"""BERT-family sequence classification on SST-2 (or any text/label TSV/CSV), via transformers.

Data path: rows are read with `datasets` (local GLUE TSV under the data root, the hub's
`nyu-mll/glue`/`sst2` when online, or the user's own files), tokenized once with the model's
tokenizer and saved with `save_to_disk` under `dltrain.data.cache_dir()`; later runs load that
copy. The token ids stay in memory as lists, and `fetch(indices)` pads only the batch it is
asked for (`tokenizer.pad`), so the index-based sharding in dltrain.data works unchanged.

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
    padding: Literal["dynamic", "fixed"] = "dynamic"  # dynamic: to the longest text of each batch
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
        return AutoModelForSequenceClassification.from_config(model_config(cfg))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve(cfg.name_or_path), num_labels=cfg.num_labels)
    except (OSError, ValueError) as exc:
        raise _load_error("model", cfg.name_or_path, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def forward(model: nn.Module, batch: dict) -> Output:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = classification_output(logits, batch["labels"])
    # Tokens per example, real and as padded: issue 5's tokens/s, and the cost of padding.
    out.stats["tokens"] = batch["attention_mask"].sum(dim=1).float()
    out.stats["padded_tokens"] = torch.full_like(out.stats["tokens"], batch["input_ids"].shape[1])
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


def flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token, PaLM appendix B: 6 N + 12 L d T, where N counts the weights of the
    encoder layers, pooler and classifier (embeddings are lookups, not matmuls), L layers, d the
    hidden size, T the sequence length (the 12 L d T term is QK^T and attention x V, forward and
    backward)."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * d * d + 2 * d * ff  # Q, K, V, output projections; two feed-forward matmuls
    n = L * per_layer + d * d + d * config.num_labels  # + pooler + classifier
    return 6 * n + 12 * L * d * seq_len


def flops_per_sample(recipe: Recipe) -> int:
    """flops_per_token x T with T = data.max_length, i.e. every example padded to max_length as in
    the original. With dynamic padding the work done is smaller: the logged
    `padded_tokens_per_example` gives the real T, to use with flops_per_token."""
    T = recipe.data.max_length
    return T * flops_per_token(model_config(recipe.model), T)


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


class _PadFetch:
    """Token ids in memory; each batch padded on demand (to its longest row, or to max_length)."""

    def __init__(self, ds, tokenizer, cfg: DataConfig, device):
        self.ids = ds["input_ids"][:]  # plain lists: indexing an Arrow column row by row costs ~20x more
        self.labels = torch.tensor(ds["labels"][:], dtype=torch.long)
        self.tokenizer, self.device = tokenizer, device
        self.padding = "max_length" if cfg.padding == "fixed" else "longest"
        self.max_length = cfg.max_length

    def __call__(self, idx: torch.Tensor) -> dict:
        rows = idx.tolist()
        batch = self.tokenizer.pad({"input_ids": [self.ids[i] for i in rows]}, padding=self.padding,
                                   max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device),
                "labels": self.labels[idx].to(self.device)}


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
    tokenizer = tokenizer_for(recipe)
    splits = {k: Split(len(ds), _PadFetch(ds, tokenizer, recipe.data, device)) for k, ds in load_splits(recipe).items()}
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
