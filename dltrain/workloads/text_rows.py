"""The text workload's rows: the user's csv/tsv/json/parquet files read with `datasets`, and the
rows of any source checked before they are tokenized. dltrain.workloads.bert_data calls in here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from dltrain.data import DataError, cache_dir

if TYPE_CHECKING:
    from dltrain.workloads.bert import DataConfig

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # any other suffix: CSV (TSV for .tsv/.tab/.txt)


def read_file(path: Path):
    from datasets import load_dataset

    if path.suffix.lower() in FORMATS:  # json, jsonl, parquet: datasets' own readers
        try:
            return load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train",
                                cache_dir=str(cache_dir() / "hf_datasets"))
        except Exception as exc:  # pyarrow raises many types for malformed files
            raise DataError(f"cannot read {path} ({str(exc).splitlines()[0][:200]})") from None
    tsv = path.suffix.lower() in (".tsv", ".tab", ".txt")
    # QUOTE_NONE for TSV: GLUE text holds bare quote characters; keep_default_na=False keeps a
    # text such as "null" or "nan" a string.
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    _check_rows(path, "tab" if tsv else "comma", **kwargs)
    try:
        return load_dataset("csv", data_files=str(path), split="train", keep_default_na=False,
                            cache_dir=str(cache_dir() / "hf_datasets"), **kwargs)
    except Exception as exc:  # pandas and pyarrow raise many types for malformed files
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header only
            raise DataError(f"{path}: no rows (the file holds a header only): give a file with examples") from None
        raise DataError(f"cannot read {path} as {'TSV' if tsv else 'CSV'} ({str(exc).splitlines()[0][:200]})") from None


def _check_rows(path: Path, separator: str, **dialect) -> None:
    """Every row has as many fields as the header, or a DataError naming the line. Past this,
    pandas stops at a long row with "An error occurred while generating the dataset" and reads a
    short one's missing label as an empty string."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:  # undecodable bytes: load_dataset reports them
        reader = csv.reader(f, **dialect)
        try:
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):  # pandas skips blank lines too
                    fields = f"{len(row)} {separator}-separated field{'s' * (len(row) != 1)}"
                    raise DataError(f"{path}, line {reader.line_num}: {fields} where the header has {len(header)}: "
                                    "fix or remove that row")
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}: fix that row") from None


def check(ds, cfg: DataConfig, where: str, num_labels: int) -> dict | None:
    """Rows with the text column(s) and a label the model has an output for, or a DataError that
    says what to change. Returns label name -> id for string labels, None for integer ids."""
    columns = [cfg.text_column, *([cfg.text_pair_column] if cfg.text_pair_column else []), cfg.label_column]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_column" + (", data.text_pair_column" if cfg.text_pair_column else "") + " and data.label_column"
        )
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    labels = set(ds.unique(cfg.label_column))
    shown = ", ".join(repr(v) for v in sorted(labels, key=str)[:5])
    if any(isinstance(v, str) for v in labels):
        if not cfg.label_names:
            raise DataError(f"{where}: the labels are strings ({shown}): name them in id order in data.label_names, "
                            f"e.g. --set 'data.label_names=[{', '.join(sorted(map(str, labels))[:5])}]'")
        unknown = sorted(map(str, labels - set(cfg.label_names)))
        if unknown:
            raise DataError(f"{where}: label {unknown[0]!r} is not in data.label_names ({', '.join(cfg.label_names)}): "
                            "add it, or fix that row")
        return {name: i for i, name in enumerate(cfg.label_names)}
    check_label_ids(labels, where, num_labels)
    return None


def check_label_ids(labels: set, where: str, num_labels: int) -> None:
    """Integer labels the model has an output for (ids 0 .. num_labels-1), or a DataError."""
    if not labels <= set(range(num_labels)):
        shown = ", ".join(repr(v) for v in sorted(labels, key=str)[:5])
        allowed = "0 or 1 (binary classification)" if num_labels == 2 else f"integers 0 to {num_labels - 1}"
        raise DataError(f"{where}: labels must be {allowed}, found {shown}: set model.num_labels (or data.label_names) "
                        "to the number of classes")
