"""The text workload's data half: rows from SST-2, a `datasets.load_dataset` spec or the user's
csv/tsv/json/parquet files, tokenized once into a cache, then padded into tensors on the training
device.

Rows are read with `datasets` (local GLUE TSV under the data root, the hub's `nyu-mll/glue`/`sst2`
when online, `data.dataset` (+ `data.config`) from the hub or a local folder, or the user's own
files: read, like every row's checks, in dltrain.workloads.text_rows), labels checked (integer ids
below num_labels, or strings mapped by `data.label_names`), tokenized once with the model's
tokenizer (one text, or a sentence pair) and saved with `save_to_disk` under
`dltrain.data.cache_dir()`; later runs load that copy. `device_splits` then
pads every text to max_length once, into tensors on the training device (`TokenSplit`), and a batch
is a slice of them: no tokenizer call and no host-to-device copy per step, and the index-based
sharding in dltrain.data works unchanged.

This module takes the `data` section and a tokenizer; dltrain.workloads.bert, which holds the
config classes and the model, builds both from a recipe and calls in here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from dltrain.data import DataError, DataSplits, Split, cache_dir, data_root, say, sha256_of
from dltrain.workloads.text_config import DataConfig
from dltrain.workloads.text_rows import check, check_label_ids, read_file

TOKENIZE_CALLS = 0  # how many splits were tokenized (not loaded from the cache) in this process
# bump when the tokenized format or the key changes (2: a completion marker in each folder; 3: keys
# from the contents of the data file and the tokenizer, not their paths, so a cache copied to
# another machine, e.g. carried to a GPU loan by benchmarks/device_check.sh, is found there)
_CACHE_VERSION = 3
_DONE = "dltrain-complete.json"  # written last into a cache folder: {file: [bytes, sha256]} of the others
_HOW_TO_DATA = (
    "put GLUE's SST-2 train.tsv and dev.tsv in <root>/sst2/ and point data.root or DLTRAIN_DATA_DIR at "
    "<root>, or give data.train_file and data.eval_file"
)


def _offline() -> bool:
    return any(
        os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DLTRAIN_OFFLINE")
    )


def _source_files(cfg: DataConfig, only: tuple[str, ...] | None = None) -> dict[str, Path] | None:
    """split -> file, or None to use the hub (SST-2, or data.dataset). Raises DataError when nothing
    usable is found. `only`: the splits needed (evaluation reads one), whose files alone must exist."""
    if cfg.dataset:
        return None
    if cfg.train_file or cfg.eval_file:
        if not (cfg.train_file and cfg.eval_file):
            raise DataError(
                "data.train_file and data.eval_file go together: give both (eval_file is the validation set)"
            )
        files = {"train": cfg.train_file, "val": cfg.eval_file} | ({"test": cfg.test_file} if cfg.test_file else {})
        files = {k: Path(v).expanduser() for k, v in files.items() if only is None or k in only}
        for key, path in files.items():
            if not path.is_file():
                raise DataError(f"data file not found: {path} (data.{'eval' if key == 'val' else key}_file)")
        return files
    sst2 = data_root(cfg.root) / "sst2"
    wanted = {"train": sst2 / "train.tsv", "val": sst2 / "dev.tsv"}
    wanted = {k: v for k, v in wanted.items() if only is None or k in only}
    if all(path.is_file() for path in wanted.values()):
        return wanted
    if _offline():
        raise DataError(f"SST-2 not found in {sst2} and downloads are off (offline mode): {_HOW_TO_DATA}")
    return None


def _read_hub(split: str, dataset: str | None = None, config: str | None = None):
    """A split of `dataset` (a hub id or a local dataset folder), by default SST-2 from the hub."""
    from datasets import load_dataset

    try:
        return load_dataset(
            dataset or "nyu-mll/glue",
            config if dataset else "sst2",
            split=split,
            cache_dir=str(cache_dir() / "hf_datasets"),
        )
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if dataset is None:
            raise DataError(f"SST-2 download from the hub failed ({reason}): {_HOW_TO_DATA}") from None
        raise DataError(
            f"cannot load split {split!r} of data.dataset {dataset!r}"
            + (f" (config {config!r})" if config else "")
            + f" ({reason}): check data.dataset, data.config "
            "and the split names (data.train_split, eval_split, test_split), or load it once while online"
        ) from None


def _cache_key(source: str, cfg: DataConfig, tokenizer) -> str:
    ident = {
        "source": source,
        "text": cfg.text_column,
        "label": cfg.label_column,
        "max_length": cfg.max_length,
        "tokenizer": [_tokenizer_ident(tokenizer), type(tokenizer).__name__, len(tokenizer)],
        "v": _CACHE_VERSION,
    }
    # Only when set, so that the keys of single-text, integer-label caches stay as they were.
    if cfg.text_pair_column:
        ident["pair"] = cfg.text_pair_column
    if cfg.label_names:
        ident["label_names"] = cfg.label_names
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_ident(tokenizer) -> str:
    """A fast tokenizer's definition (vocabulary, normalizer, pre-tokenizer, post-processor)
    hashed: the same wherever its files lie; a slow one's path. Truncation and padding are left
    out: each call sets them on the backend (the key would change after the first split), and the
    cache key holds max_length itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.name_or_path
    spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    return "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _content_ident(path: Path) -> str:
    """A data file by its contents: the cache entry survives a copy (another path, another mtime)
    and an edited file is a new entry. Hashing reads the file once, far less than tokenizing it."""
    return f"file:{path.stat().st_size}:{sha256_of(path)}"


def _file_ident(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def tokenized_split(read, source: str, cfg: DataConfig, tokenizer, where: Path | str, num_labels: int = 2):
    """A datasets.Dataset with input_ids and labels, from the cache or tokenized now and cached.

    Several processes may start together: the main process goes first and writes the cache
    (atomically, by renaming a finished folder), the others then load it. A cached folder is used
    only when its files match the sizes and checksums its completion marker lists; a damaged one
    (a truncated file, a missing marker) is rebuilt, with one warning.
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    global TOKENIZE_CALLS
    target = cache_dir() / "tokenized" / _cache_key(source, cfg, tokenizer)
    with PartialState().main_process_first():
        if target.is_dir():
            damage = _damage(target)
            if damage is None:
                ds = load_from_disk(str(target))
                # model.num_labels is not in the key: a cache tokenized for more classes is refused
                # here as a fresh read refuses it, not left to fail in the loss. (String labels are
                # ids below len(data.label_names), which is in the key and equals num_labels.)
                check_label_ids(set(ds.unique("labels")), where, num_labels)
                return ds
            say("warning", f"tokenized cache {target} is damaged ({damage}): rebuilding it from {where}")
            _discard(target)
        ds, label_ids = check(read(), cfg, where, num_labels)
        TOKENIZE_CALLS += 1

        def encode(rows):
            texts = [rows[cfg.text_column]] + ([rows[cfg.text_pair_column]] if cfg.text_pair_column else [])
            labels = rows[cfg.label_column]
            return tokenizer(*texts, truncation=True, max_length=cfg.max_length) | {
                "labels": [label_ids[v] for v in labels] if label_ids else labels
            }

        ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {where}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        ds.save_to_disk(str(tmp))
        (tmp / _DONE).write_text(json.dumps(_fingerprint(tmp)))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return load_from_disk(str(target))


def _fingerprint(folder: Path) -> dict[str, list]:
    return {
        p.name: [p.stat().st_size, sha256_of(p)] for p in sorted(folder.iterdir()) if p.is_file() and p.name != _DONE
    }


def _damage(folder: Path) -> str | None:
    """None when `folder` holds every file its marker lists, at the listed size and checksum; else what is wrong."""
    try:
        marker = json.loads((folder / _DONE).read_text())
        listed = {name: (int(size), str(sha256)) for name, (size, sha256) in marker.items()}
    except FileNotFoundError:
        return "no completion marker: it was never finished"
    except (OSError, ValueError, TypeError, AttributeError):  # not JSON, or not {name: [size, sha256]}
        listed = {}
    if not listed:
        return "unreadable completion marker"
    for name, (size, sha256) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, not {size}"
        if sha256_of(path) != sha256:
            return f"{name} fails its checksum"
    return None


def _discard(folder: Path) -> None:
    """Out of the way first (a rename is atomic), then deleted: the rebuilt folder takes its name."""
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.damaged")
    try:
        os.replace(folder, trash)
    except OSError:  # already moved by another process
        return
    shutil.rmtree(trash, ignore_errors=True)


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
        lengths, ids = _padded(table.column("input_ids"), cfg.max_length, pad_id)
        super().__init__(len(lengths), self.fetch_one)
        self.ids, self.lengths = ids.to(device), lengths.to(device)
        # Sentence pairs: segment ids (0 for the first text, 1 for the second), padded with 0 as
        # tokenizer.pad does; single texts leave them to the model (all 0).
        pairs = cfg.text_pair_column and "token_type_ids" in table.column_names
        self.types = _padded(table.column("token_type_ids"), cfg.max_length, 0)[1].to(device) if pairs else None
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
            batch = {
                "input_ids": self.ids[idx, :T],
                "attention_mask": (self.positions[:T] < self.lengths[idx, None]).long(),
                "labels": self.labels[idx],
            }
            if self.types is not None:
                batch["token_type_ids"] = self.types[idx, :T]
            yield batch

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


def _padded(column, max_length: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [N], values [N, max_length]) of an Arrow list column, each row left-aligned and
    filled with `fill`. Through Arrow, not Python lists: 15 ms for SST-2's 67k texts, against 0.8 s."""
    column = column.combine_chunks()
    lengths, flat = _long(column.value_lengths()), _long(column.flatten())
    values = torch.full((len(lengths), max_length), fill, dtype=torch.long)
    values[torch.arange(max_length) < lengths[:, None]] = flat  # row by row, left-aligned
    return lengths, values


def _long(arrow_array) -> torch.Tensor:
    # A copy: Arrow's memory is read-only.
    return torch.tensor(arrow_array.to_numpy(zero_copy_only=False), dtype=torch.long)


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return ds.select(sorted(order.tolist()))


def _hub_sources(cfg: DataConfig) -> dict[str, tuple]:
    """split -> (reader, cache identity, name in messages) for SST-2 from the hub or data.dataset."""
    if not cfg.dataset:  # SST-2's test split has no labels: train and validation only
        return {
            split: (functools.partial(_read_hub, hub_split), f"hub:nyu-mll/glue/sst2/{hub_split}", f"SST-2 {hub_split}")
            for split, hub_split in (("train", "train"), ("val", "validation"))
        }
    names = {"train": cfg.train_split, "val": cfg.eval_split} | ({"test": cfg.test_split} if cfg.test_split else {})
    folder = Path(cfg.dataset).expanduser()
    # A local folder's identity includes its files' sizes and times: an edited file is a new cache entry.
    ident = (
        f"dir:{_file_ident(folder)}:" + ",".join(_file_ident(p) for p in sorted(folder.rglob("*")) if p.is_file())
        if folder.is_dir()
        else f"hub:{cfg.dataset}"
    )
    shown = cfg.dataset + (f"/{cfg.config}" if cfg.config else "")
    return {
        split: (
            functools.partial(_read_hub, name, cfg.dataset, cfg.config),
            f"{ident}/{cfg.config}/{name}",
            f"{shown} {name}",
        )
        for split, name in names.items()
    }


def tokenized_splits(
    cfg: DataConfig, tokenizer, seed: int, num_labels: int = 2, only: tuple[str, ...] | None = None
) -> dict:
    """split name -> tokenized datasets.Dataset (train, val, and test where the source has one;
    with `only`, those of them alone); the subsets are drawn by `seed`."""
    files = _source_files(cfg, only)
    if files is None:
        sources = _hub_sources(cfg)
    else:
        texts = [cfg.text_column, *([cfg.text_pair_column] if cfg.text_pair_column else [])]
        sources = {
            split: (functools.partial(read_file, path, texts), _content_ident(path), path)
            for split, path in files.items()
        }
    sources = {k: v for k, v in sources.items() if only is None or k in only}
    out = {
        split: tokenized_split(read, ident, cfg, tokenizer, where, num_labels)
        for split, (read, ident, where) in sources.items()
    }
    for split, n in (("train", cfg.train_subset), ("val", cfg.eval_subset)):
        if split in out:
            out[split] = _subset(out[split], n, seed)
    return out


def device_split(cfg: DataConfig, tokenizer, seed: int, device, num_labels: int, split: str) -> TokenSplit | None:
    """One held-out split ("val", "test") on the device, reading no other split (`dltrain eval`);
    None where the source has none."""
    ds = tokenized_splits(cfg, tokenizer, seed, num_labels, only=(split,)).get(split)
    return TokenSplit(ds.with_format("arrow")[:], tokenizer.pad_token_id, cfg, device) if ds is not None else None


def device_splits(
    cfg: DataConfig, tokenizer, seed: int, device: torch.device | str = "cpu", num_labels: int = 2
) -> DataSplits:
    splits = {
        k: TokenSplit(ds.with_format("arrow")[:], tokenizer.pad_token_id, cfg, device)  # the rows a subset selects
        for k, ds in tokenized_splits(cfg, tokenizer, seed, num_labels).items()
    }
    if cfg.order == "length_grouped":  # read by the training loop's index stream
        splits["train"].order_lengths, splits["train"].group = splits["train"].lengths, cfg.group_batches
    return DataSplits(train=splits["train"], val=splits["val"], test=splits.get("test"))
