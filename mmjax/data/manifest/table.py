"""Reading a manifest table and turning its cells into splits, labels and tabular values.

Every cell is read as text (pandas, `dtype=str`), so an empty cell stays distinguishable from a
value: an empty cell makes a modality absent or a label unknown, never an error. Rows are
numbered from 1 in the order of the file (row 1 is the first row after a CSV's header).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np

from mmjax.data.manifest.schema import Schema
from mmjax.data.spec import DataError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                  "valid": "validation", "dev": "validation", "test": "test", "testing": "test"}
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


@dataclasses.dataclass(frozen=True)
class BadCell:
    """Why one row cannot be used: the manifest row (1-based), its id, the column, the file, the reason."""

    row: int
    id: str
    column: str
    file: str
    reason: str

    def message(self, manifest: str) -> str:
        where = f"{manifest}: row {self.row} (id {self.id!r}), column {self.column!r}"
        return f"{where}, file {self.file}: {self.reason}" if self.file else f"{where}: {self.reason}"


def read_table(path: str):
    """The manifest as a DataFrame of strings ('' for an empty cell): CSV, TSV, JSONL or Parquet."""
    import pandas as pd

    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise DataError(f"manifest {path}: file not found")
    try:
        if ext in (".csv", ".tsv", ".tab", ".txt"):
            sep = "\t" if ext in (".tsv", ".tab") else ","
            # the header as written: pandas renames a repeated name ('age' -> 'age.1') when it reads the table
            _check_unique(pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
                          .iloc[0].tolist(), path)
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        elif ext in (".jsonl", ".ndjson"):
            df = pd.read_json(path, lines=True, dtype=False)
        elif ext in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise DataError(f"manifest {path}: unsupported format {ext!r}; use .csv, .tsv, .jsonl or .parquet")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (re-raised with the file named)
        raise DataError(f"manifest {path}: cannot read ({type(e).__name__}: {e})") from e
    _check_unique([str(c) for c in df.columns], path)  # Parquet keeps repeated names as they are
    return df.apply(lambda col: col.map(_cell_text)) if len(df) else df.astype(str)


def _check_unique(header: list, path: str) -> None:
    """A column named twice is an error naming it (empty names, as trailing commas give, are not columns)."""
    for name in dict.fromkeys(header):
        if name and header.count(name) > 1:
            raise DataError(f"manifest {path}: column {name!r} appears {header.count(name)} times in the header; "
                            f"give each column its own name")


LIST_SEPARATOR = "\x1f"  # joins a JSON/Parquet list cell; multilabel cells split on it too


def _cell_text(v) -> str:
    import pandas as pd

    if isinstance(v, (list, tuple, np.ndarray)):
        return LIST_SEPARATOR.join(_cell_text(x) for x in v)
    if v is None or pd.isna(v):  # None, NaN, pd.NA, NaT: an empty cell
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def check_columns(df, schema: Schema, manifest: str) -> None:
    missing = [c for c in schema.columns() if c not in df.columns]
    if missing:
        raise DataError(f"manifest {manifest}: missing column(s) {missing} named in the schema {schema.path}; "
                        f"it has {list(df.columns)}")


def hash_unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string (SHA-256)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def empty_ids(ids: list, column: str) -> list[BadCell]:
    return [BadCell(i + 1, pid, column, "", "empty id") for i, pid in enumerate(ids) if not pid]


def assign_splits(df, schema: Schema, fractions: dict, folds: int, fold: int, manifest: str) -> tuple[list, list]:
    """(split per row, bad cells). With a split column, its values; else by a hash of the id with
    `fractions`. With `folds` > 1, patient-level k-fold: ids ranked by hash and dealt round-robin to
    the folds (every id in exactly one fold). Without a split column fold `fold` is the test set and
    a `fractions['validation']` share of the rest (by hash) is validation; with one, the column's test
    rows stay test and fold `fold` of the other ids is validation."""
    ids = df[schema.id].tolist()
    bad = empty_ids(ids, schema.id)
    if folds > 1 and not 0 <= fold < folds:
        raise DataError(f"fold={fold} is not in [0, {folds})")
    total = sum(fractions.values())
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()) or not total > 0:
        raise DataError(f"split fractions {fractions}: need non-negative train, validation and test")
    cut_train = fractions["train"] / total
    cut_val = cut_train + fractions["validation"] / total

    def by_hash(pid):
        u = hash_unit(pid)
        return "train" if u < cut_train else "validation" if u < cut_val else "test"

    fold_of = {}
    if folds > 1:
        ranked = sorted(set(ids), key=lambda p: (hash_unit(f"fold:{p}"), p))
        fold_of = {p: i % folds for i, p in enumerate(ranked)}
    splits = []
    if schema.split:
        for i, (pid, cell) in enumerate(zip(ids, df[schema.split].tolist())):
            cell = cell or by_hash(pid)  # an empty split cell: by the id's hash, as without a split column
            split = _SPLIT_ALIASES.get(cell.lower())
            if split is None:
                bad.append(BadCell(i + 1, pid, schema.split, "", f"split {cell!r} is not one of {list(SPLITS)}"))
            elif folds > 1 and split != "test":
                split = "validation" if fold_of[pid] == fold else "train"
            splits.append(split)
        seen = {}
        for i, (pid, split) in enumerate(zip(ids, splits)):
            if split and seen.setdefault(pid, split) != split:
                raise DataError(f"manifest {manifest}: id {pid!r} is in two splits ({seen[pid]} and {split}, "
                                f"row {i + 1}); a patient's rows must share one split")
        return splits, bad
    for pid in ids:
        if folds > 1:
            rest_val = fractions["validation"] / (fractions["train"] + fractions["validation"] or 1)
            splits.append("test" if fold_of[pid] == fold else
                          "validation" if hash_unit(f"val:{pid}") < rest_val else "train")
        else:
            splits.append(by_hash(pid))
    return splits, bad


def parse_number(cell: str) -> float | None:
    """A finite float, None for an empty cell; ValueError for anything else (text, NaN, inf)."""
    if cell == "":
        return None
    value = float(cell)
    if not math.isfinite(value):
        raise ValueError(f"{cell!r} is not a finite number")
    return value


def parse_labels(df, name: str, t: dict, train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list, list]:
    """(labels, known, classes, bad cells) of one task over every row. Multiclass classes come from the
    schema or, sorted, from the training rows; a label outside them is a bad cell."""
    n = len(df)
    unknown_values = set(t["unknown_values"])
    bad = []
    kind = t["kind"]
    classes = list(t.get("classes") or [])
    if kind == "multilabel" and "columns" in t:
        classes = list(t["columns"])
        cells = np.stack([df[c].to_numpy(str) for c in classes], axis=1)
        labels, known = np.zeros((n, len(classes)), np.float32), np.zeros((n, len(classes)), bool)
        for i in range(n):
            for k, c in enumerate(classes):
                cell = str(cells[i, k])  # a Python str: numpy's repr would show np.str_('...') in messages
                v = _binary(cell, None, unknown_values)
                if v == "bad":
                    bad.append((i, c, f"label {cell!r} is not 0/1, true/false, yes/no"))
                elif v is not None:
                    labels[i, k], known[i, k] = v, True
        return labels, known, classes, bad
    col = df[t["column"]].to_numpy(str)
    if kind == "multiclass" and not classes:
        classes = sorted({str(c) for c in col[train_rows] if c and c not in unknown_values})
        if len(classes) < 2:
            raise DataError(f"task {name!r}: the training split has {len(classes)} class(es) in column "
                            f"{t['column']!r}; a multiclass task needs at least 2 (or list them as 'classes')")
    index = {c: k for k, c in enumerate(classes)}
    if kind == "multilabel":
        labels, known = np.zeros((n, len(classes)), np.float32), np.zeros((n, len(classes)), bool)
    else:
        labels = np.zeros(n, np.int64 if kind == "multiclass" else np.float32)
        known = np.zeros(n, bool)
    for i, cell in enumerate(col.tolist()):  # Python str, so messages quote 'x', not np.str_('x')
        if cell == "" or cell in unknown_values:
            continue
        if kind == "binary":
            v = _binary(cell, t.get("positive"), unknown_values)
            if v == "bad":
                bad.append((i, t["column"], f"label {cell!r} is not 0/1, true/false, yes/no, y/n"))
                continue
            labels[i] = v
        elif kind == "regression":
            try:
                labels[i] = parse_number(cell)
            except ValueError:
                bad.append((i, t["column"], f"label {cell!r} is not a finite number"))
                continue
        elif kind == "multiclass":
            if cell not in index:
                bad.append((i, t["column"], f"label {cell!r} is not among the classes {classes}"))
                continue
            labels[i] = index[cell]
        else:
            parts = cell.split(LIST_SEPARATOR)
            items = {s.strip() for part in parts for s in part.split(t.get("separator", ";")) if s.strip()}
            other = sorted(items - set(index))
            if other and t.get("other_labels", "error") == "error":
                bad.append((i, t["column"], f"labels {other} are not among the classes {classes} "
                                            f"(other_labels: ignore leaves them out)"))
                continue
            labels[i] = [float(c in items) for c in classes]
        known[i] = True
    return labels, known, classes, bad


def _binary(cell: str, positive, unknown_values: set):
    """1.0 / 0.0, None (empty or unknown) or 'bad'."""
    if cell == "" or cell in unknown_values:
        return None
    if positive is not None:
        return 1.0 if cell == str(positive) else 0.0
    low = cell.lower()
    return 1.0 if low in _TRUE else 0.0 if low in _FALSE else "bad"
