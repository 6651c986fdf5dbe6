"""The text workload's rows: the user's csv/tsv/json/parquet files read with `datasets`, and the
rows of any source checked before they are tokenized.

A row the tokenizer or the loss cannot take is refused here in one DataError that names the file,
the line (a row number where the file has no lines: parquet, a hub dataset) and the fix: a text
that is null, a label that is missing, labels that mix ids and names, bytes that are not UTF-8, a
line that is not JSON. A number where a text belongs is a text (5 -> "5"; in a csv, as written).
dltrain.workloads.bert_data calls in here; `where` is then the file's Path for a file, a name in
words for any other source.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dltrain.data import DataError, cache_dir

if TYPE_CHECKING:
    from dltrain.workloads.text_config import DataConfig

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # any other suffix: CSV (TSV for .tsv/.tab/.txt)
# Python's csv module refuses a field past 131,072 characters by default. pandas, which reads the
# rows, has no limit, and the tokenizer truncates a long text to data.max_length: only memory
# bounds a field. (The limit is process-wide; raising it lets longer fields through, nothing else.)
_CSV_FIELD_LIMIT = 2**31 - 1


def read_file(path: Path, text_columns: list[str]):
    """A datasets.Dataset of the file's rows; `text_columns` are read as written (a csv column of
    numbers stays text: pandas would make it integers, and "007" would become 7)."""
    from datasets import load_dataset

    suffix = path.suffix.lower()
    if suffix in FORMATS:  # json, jsonl, parquet: datasets' own readers
        try:
            return load_dataset(
                FORMATS[suffix], data_files=str(path), split="train", cache_dir=str(cache_dir() / "hf_datasets")
            )
        except Exception as exc:  # pyarrow raises many types for malformed files
            found = _not_utf8(path) or _not_json(path) if suffix != ".parquet" else None
            raise (found or DataError(f"cannot read {path} ({str(exc).splitlines()[0][:200]})")) from None
    tsv = _is_tsv(path)
    _check_rows(path, "tab" if tsv else "comma")
    try:
        # keep_default_na=False keeps a text such as "null" or "nan" a string; converters keep
        # every value of a text column the string it is in the file (pandas infers a type per
        # 10,000-row chunk, and the tokenizer takes no numbers).
        return load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            keep_default_na=False,
            converters={column: str for column in text_columns},
            cache_dir=str(cache_dir() / "hf_datasets"),
            **_dialect(path),
        )
    except Exception as exc:  # pandas and pyarrow raise many types for malformed files
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header only
            raise DataError(f"{path}: no rows (the file holds a header only): give a file with examples") from None
        raise DataError(f"cannot read {path} as {'TSV' if tsv else 'CSV'} ({str(exc).splitlines()[0][:200]})") from None


def _is_tsv(path: Path) -> bool:
    return path.suffix.lower() in (".tsv", ".tab", ".txt")


def _dialect(path: Path) -> dict:
    # QUOTE_NONE for TSV: GLUE text holds bare quote characters.
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if _is_tsv(path) else {}


def _reader(f, path: Path):
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    return csv.reader(f, **_dialect(path))


def _check_rows(path: Path, separator: str) -> None:
    """Every row has as many fields as the header and the file is UTF-8, or a DataError naming the
    line. Past this, pandas stops at a long row or a byte it cannot decode with "An error occurred
    while generating the dataset", and reads a short row's missing label as an empty string."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = _reader(f, path)
        try:
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):  # pandas skips blank lines too
                    fields = f"{len(row)} {separator}-separated field{'s' * (len(row) != 1)}"
                    raise DataError(
                        f"{path}, line {reader.line_num}: {fields} where the header has {len(header)}: "
                        "fix or remove that row"
                    )
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: {exc}: fix that row") from None
        except UnicodeDecodeError:  # decoded in blocks: the line is found by _not_utf8
            raise _not_utf8(path) or DataError(f"{path}: not UTF-8 text: save it as UTF-8") from None


def _not_utf8(path: Path) -> DataError | None:
    """The first line that is not UTF-8, the one encoding `datasets` reads, as a DataError; None if all are."""
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(
                    f"{path}, line {n}: not UTF-8 text (byte 0x{line[exc.start]:02x}; a latin-1 or "
                    "Windows-1252 file?): save it as UTF-8, e.g. iconv -f latin1 -t utf-8 OLD > NEW"
                )
    return None


def _not_json(path: Path) -> DataError | None:
    """The first line of a JSON Lines file that is not one JSON object, as a DataError; None if all are."""
    with path.open(encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document, a list of rows: its parser knows the line
        try:
            json.loads(text)
        except ValueError as exc:
            return DataError(f"{path}, line {exc.lineno}: not JSON ({exc.msg}): fix the file")
        return None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            return DataError(
                f"{path}, line {n}: not JSON ({exc.msg}, column {exc.colno}): fix that line "
                "(JSON Lines hold one {...} object per line)"
            )
        if not isinstance(row, dict):
            return DataError(
                f"{path}, line {n}: not a JSON object but a {type(row).__name__} {line.strip()[:40]!r}: "
                'give each row as one {"column": value, ...} object per line'
            )
    return None


def row_name(where: Path | str, index: int) -> str:
    """'line N' of row `index` (from 0, the header not counted) of a csv, tsv or JSON Lines file; else 'row N'."""
    if isinstance(where, Path) and where.suffix.lower() != ".parquet":
        with where.open(newline="", encoding="utf-8") as f:
            if where.suffix.lower() not in FORMATS:
                starts = _row_starts(_reader(f, where))
            elif f.read(4096).lstrip().startswith("["):  # a JSON list of rows: rows are not lines
                starts = iter(())
            else:  # JSON Lines: datasets skips blank lines
                f.seek(0)
                starts = (n for n, line in enumerate(f, 1) if line.strip())
            line = next(itertools.islice(starts, index, None), None)
        if line is not None:
            return f"line {line}"
    return f"row {index + 1}"


def _row_starts(reader):
    """The line on which each data row of a csv file starts (a quoted field may span lines)."""
    next(reader, None)  # the header
    start = reader.line_num + 1
    for row in reader:
        if row:  # pandas skips blank lines
            yield start
        start = reader.line_num + 1


def check(ds, cfg: DataConfig, where: Path | str, num_labels: int):
    """(rows, label name -> id) with the text column(s) as strings and a label the model has an
    output for, or a DataError that says what to change. The mapping is None for integer ids."""
    columns = [cfg.text_column, *([cfg.text_pair_column] if cfg.text_pair_column else []), cfg.label_column]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
            "set data.text_column"
            + (", data.text_pair_column" if cfg.text_pair_column else "")
            + " and data.label_column"
        )
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    for column in columns[:-1]:
        ds = _as_text(ds, column, where)
    return ds, _label_ids(ds, cfg, where, num_labels)


def _first(mask) -> int:
    """The index of the first true value of an Arrow boolean array, -1 if none."""
    import pyarrow.compute as pc

    return pc.index(mask, True).as_py()


def _is_string(values) -> bool:
    import pyarrow as pa

    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)


def _as_text(ds, column: str, where):
    """`ds` with `column` as strings: numbers (a JSON number, a parquet int column, or datasets'
    Json type for a column that mixes them with strings) become the text the file writes."""
    import pyarrow.compute as pc

    def refuse(index: int, value):
        found = (
            f"no text in column {column!r} (null)"
            if value is None
            else f"a JSON {'list' if isinstance(value, list) else 'object'} in column {column!r}, not a text"
        )
        raise DataError(f"{where}, {row_name(where, index)}: {found}: give every row a text, or remove that row")

    values = ds.data.column(column)
    if _is_string(values):
        if values.null_count:
            refuse(_first(pc.is_null(values)), None)
        return ds
    texts = ds[column]  # decoded: str, int, float, bool, None, list, dict
    for i, value in enumerate(texts):
        if value is None or isinstance(value, (list, dict)):
            refuse(i, value)
    texts = [value if isinstance(value, str) else json.dumps(value) for value in texts]
    return ds.remove_columns(column).add_column(column, texts)


def _label_ids(ds, cfg: DataConfig, where, num_labels: int) -> dict | None:
    """label name -> id for string labels, None for integer ids; a DataError for a missing label,
    a mix of ids and names, a name not in data.label_names or an id the model has no output for."""
    import pyarrow as pa
    import pyarrow.compute as pc

    name = cfg.label_column
    values = ds.data.column(name)

    def refuse_missing(index: int):  # a csv's empty field, a JSON null
        raise DataError(
            f"{where}, {row_name(where, index)}: no label in column {name!r}: give every row a label, "
            "or remove that row"
        )

    if values.null_count:
        refuse_missing(_first(pc.is_null(values)))
    if _is_string(values) and _first(pc.equal(values, "")) >= 0:
        refuse_missing(_first(pc.equal(values, "")))
    decoded = None
    if _is_string(values) or pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        labels = set(ds.unique(name))
    else:  # datasets' Json type: the column mixes kinds of values
        decoded = ds[name]
        if None in decoded:
            refuse_missing(decoded.index(None))
        kind = [
            "a name" if isinstance(v, str) else "an id" if isinstance(v, (int, float)) else "neither" for v in decoded
        ]
        odd = next((i for i, k in enumerate(kind) if k != kind[0] or k == "neither"), None)
        if odd is not None:
            found = (
                f"{decoded[odd]!r} is not an id or a name"
                if kind[odd] == "neither"
                else f"{decoded[odd]!r} is {kind[odd]} where {row_name(where, 0)} has {kind[0]} ({decoded[0]!r})"
            )
            raise DataError(
                f"{where}, {row_name(where, odd)}: label {found}: give every label as an id "
                "(0, 1, ...), or every one as a name listed in data.label_names"
            )
        labels = set(decoded)
    shown = ", ".join(repr(v) for v in sorted(labels, key=str)[:5])
    if any(isinstance(v, str) for v in labels):
        if not cfg.label_names:
            raise DataError(
                f"{where}: the labels are strings ({shown}): name them in id order in data.label_names, "
                f"e.g. --set 'data.label_names=[{', '.join(map(_yaml_item, sorted(map(str, labels))[:5]))}]'"
            )
        unknown = sorted(map(str, labels - set(cfg.label_names)))
        if unknown:
            first = decoded.index(unknown[0]) if decoded is not None else _first(pc.equal(values, unknown[0]))
            raise DataError(
                f"{where}, {row_name(where, first)}: label {unknown[0]!r} is not in data.label_names "
                f"({', '.join(cfg.label_names)}): add it, or fix that row"
            )
        return {label: i for i, label in enumerate(cfg.label_names)}
    check_label_ids(labels, where, num_labels)
    return None


def _yaml_item(name: str) -> str:
    """`name` as an item of a YAML list that reads back as that string: quoted where YAML would read
    a number, a boolean or a null, or split it (a label "1" among names is a string, and
    data.label_names takes strings only)."""
    import yaml

    try:
        plain = yaml.safe_load(f"[{name}]") == [name]
    except yaml.YAMLError:
        plain = False
    return name if plain else json.dumps(name)


def check_label_ids(labels: set, where, num_labels: int) -> None:
    """Integer labels the model has an output for (ids 0 .. num_labels-1), or a DataError."""
    if not labels <= set(range(num_labels)):
        shown = ", ".join(repr(v) for v in sorted(labels, key=str)[:5])
        allowed = "0 or 1 (binary classification)" if num_labels == 2 else f"integers 0 to {num_labels - 1}"
        raise DataError(
            f"{where}: labels must be {allowed}, found {shown}: set model.num_labels (or data.label_names) "
            "to the number of classes"
        )
