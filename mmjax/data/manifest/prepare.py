"""From a manifest and its schema to examples ready to write, and the dataset's spec.

1. Cells: splits, labels, tabular values and text (inline or .txt files) are parsed in this process.
2. Files: every distinct image and signal file inside the allowed roots is decoded once, in parallel
   on all cores, into a cache of .npy arrays (the writer then reads those instead of decoding twice);
   an image over `max_pixels` is refused from its header.
3. Bad rows: with `on_error: strict` the first bad row (in file order) stops preparation with an
   error naming the row, column, file and reason; with `skip` every bad row is left out and listed.
4. Fit on the kept training rows: image mean/std per channel, one WordPiece vocabulary per text
   modality (words of at least `text_min_patients` patients), numeric means/stds (log where asked)
   and categorical vocabularies per tabular modality, multiclass classes, task counts, regression
   mean/std.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import multiprocessing
import os
import time

import numpy as np

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.data.manifest import readers
from mmjax.data.manifest.schema import Schema
from mmjax.data.manifest.table import (
    BadCell,
    assign_splits,
    check_columns,
    empty_ids,
    parse_labels,
    parse_number,
    read_table,
)
from mmjax.data.spec import DataError, DatasetSpec, length_histogram, std_with_floor
from mmjax.data.tokenizer import WordPieceTokenizer

_IN_PROCESS_BELOW = 64  # fewer files than this are decoded without starting worker processes
# 2**28 pixels: 512 MiB of 16-bit pixel data per decoding process. Above the largest routine single images
# (a mammogram is ~30M) and a 1024-slice 512x512 CT volume in one file; a whole-slide image (1e9+) is refused.
DEFAULT_MAX_PIXELS = 2**28
DEFAULT_TEXT_MIN_PATIENTS = 5  # a word enters a vocabulary only from the notes of this many patients


@dataclasses.dataclass
class Prepared:
    spec: DatasetSpec
    rows: list  # kept rows, each a dict ready for `example`
    skipped: list  # BadCell of every row left out (on_error: skip)
    summary: dict


def _decode(job):
    """Worker: decode one file into the cache. Returns (key, error or None, channel sums or None)."""
    key, kind, path, settings, out = job
    try:
        if kind == "image":
            x = readers.read_image(path, settings["size"], settings["channels"], settings.get("window"),
                                   settings["max_pixels"])
            xf = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
            stats = (xf.sum(0), (xf * xf).sum(0), xf.shape[0])
        else:
            x = readers.read_signal(path, settings["rate"], settings["channels"], file_rate=settings.get("file_rate"),
                                    variable=settings.get("variable"))
            stats = None
        np.save(out, x, allow_pickle=False)
        return key, None, stats
    except readers.ReadError as e:
        return key, str(e), None
    except Exception as e:  # noqa: BLE001  (any failure of a third-party decoder is this file's problem)
        return key, f"cannot decode ({type(e).__name__}: {e})", None


def _decode_all(jobs, workers: int, log) -> dict:
    results, start = {}, time.perf_counter()
    if not jobs:
        return results
    if len(jobs) < _IN_PROCESS_BELOW or workers <= 1:
        it = map(_decode, jobs)
        pool = None
    else:  # spawn, not fork: the parent may hold JAX's threads
        pool = multiprocessing.get_context("spawn").Pool(workers)
        it = pool.imap_unordered(_decode, jobs, chunksize=8)
    try:
        for i, (key, err, stats) in enumerate(it, 1):
            results[key] = (err, stats)
            if i % 500 == 0 or i == len(jobs):
                rate = i / (time.perf_counter() - start)
                log(f"  decoded {i}/{len(jobs)} files ({rate:.0f} files/s)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


@dataclasses.dataclass
class _Parsed:
    """Every row's cells, parsed: what `prepare` fits on and `prepare_new` encodes with a saved spec."""

    ids: list
    present: dict  # modality -> [n] bool
    texts: dict  # text modality -> [n] str
    numeric: dict  # tabular modality -> [n, numeric columns] float64 (NaN: empty)
    categorical: dict  # tabular modality -> one list of n raw cells per categorical column
    paths: dict  # image/signal modality -> [n] resolved path ('' when empty)
    labels: dict  # task -> (labels, known, classes)
    keys: dict  # (modality, path) -> decoded .npy in the cache
    decoded: dict  # (modality, path) -> (error or None, image channel sums or None)
    files: int
    seconds: float


def _parse(df, schema: Schema, base: str, cache_dir: str, train_rows: np.ndarray, flag, workers, log, *,
           roots: tuple, max_pixels: int, classes: dict | None = None) -> _Parsed:
    """Cells (text, tabular, labels) and files (decoded once each, in parallel) of every row; every
    problem goes to `flag(row index, column, reason, file)`, never with a note's text. A file outside
    `roots` is a problem and is never opened. `classes` ({task: classes}) fixes the tasks' classes (a
    trained run's); tasks whose columns the table lacks get no known label."""
    n = len(df)
    present = {name: np.zeros(n, bool) for name in schema.modalities}
    texts, numeric, categorical, paths = {}, {}, {}, {}
    outside = f"outside the allowed folders {list(roots)} (allowed_roots sets them; default: the manifest's folder)"
    for name, m in schema.modalities.items():
        if m["kind"] == "text":
            texts[name] = [""] * n
            named_no_file = 0
            for i, cell in enumerate(df[m["column"]].tolist()):
                if not cell:
                    continue
                path = readers.text_path(cell, base, m.get("file"))
                if path is None:
                    texts[name][i] = cell
                    if m.get("file") is None and readers.is_text_path(cell):
                        named_no_file += 1
                elif not readers.inside(path, roots):
                    flag(i, m["column"], outside, path)
                else:
                    try:
                        texts[name][i] = readers.read_text(path)
                    except readers.ReadError as e:
                        flag(i, m["column"], str(e), path)
                present[name][i] = bool(texts[name][i].strip())
            if named_no_file:
                log(f"Text modality {name!r}: {named_no_file} cell(s) end in '.txt' but name no file; read as text "
                    f"(`file: true` in the schema makes them paths, and a missing file a bad row)")
        elif m["kind"] == "tabular":
            values = np.full((n, len(m["numeric"])), np.nan, np.float64)
            for j, col in enumerate(m["numeric"]):
                for i, cell in enumerate(df[col].tolist()):
                    try:
                        v = parse_number(cell)
                    except ValueError:
                        flag(i, col, f"{cell!r} is not a number (leave the cell empty for a missing value)")
                        continue
                    if v is not None and col in m["log"] and v <= 0:
                        flag(i, col, f"{v} is <= 0 but the column is log-scaled")
                        continue
                    values[i, j] = np.nan if v is None else v
            numeric[name] = values
            categorical[name] = [df[c].tolist() for c in m["categorical"]]
            cells_present = ~np.isnan(values).all(axis=1) if values.shape[1] else np.zeros(n, bool)
            for col in categorical[name]:
                cells_present |= np.array([c != "" for c in col])
            present[name] = cells_present
        else:
            paths[name] = [readers.resolve(c, base) if c else "" for c in df[m["column"]].tolist()]
            present[name] = np.array([bool(p) for p in paths[name]])
            for i, p in enumerate(paths[name]):
                if p and not all(readers.inside(f, roots) for f in readers.files_read(p, m["kind"])):
                    flag(i, m["column"], outside, p)
                    paths[name][i] = ""  # never opened
    labels = {}
    for name, t in schema.tasks.items():
        if classes is not None:
            columns = t["columns"] if "columns" in t else [t["column"]]
            if any(c not in df.columns for c in columns):  # labels are optional for new patients
                k = len(classes[name]) if t["kind"] == "multilabel" else 0
                shape = (n, k) if k else (n,)
                labels[name] = (np.zeros(shape, np.int64 if t["kind"] == "multiclass" else np.float32),
                                np.zeros(shape, bool), list(classes[name]))
                continue
            if t["kind"] in ("multiclass", "multilabel") and "columns" not in t:
                t = {**t, "classes": list(classes[name])}
        y, known, task_classes, task_bad = parse_labels(df, name, t, train_rows)
        labels[name] = (y, known, task_classes)
        for i, col, reason in task_bad:
            flag(i, col, reason)

    jobs, keys = [], {}
    for name, m in schema.modalities.items():
        if name not in paths:
            continue
        settings = {k: v for k, v in m.items() if k not in ("kind", "column")} | {"max_pixels": max_pixels}
        for p in dict.fromkeys(p for p in paths[name] if p):
            key = (name, p)
            out = os.path.join(cache_dir, hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".npy")
            keys[key] = out
            jobs.append((key, m["kind"], p, settings, out))
    workers = workers or os.cpu_count() or 1
    log(f"Decoding {len(jobs)} files of {n} rows on {min(workers, len(jobs) or 1)} process(es)")
    start = time.perf_counter()
    decoded = _decode_all(jobs, workers, log)
    seconds = time.perf_counter() - start
    for name, m in schema.modalities.items():
        for i, p in enumerate(paths.get(name, [])):
            if p and decoded[(name, p)][0]:
                flag(i, m["column"], decoded[(name, p)][0], p)
    return _Parsed(df[schema.id].tolist(), present, texts, numeric, categorical, paths, labels, keys, decoded,
                   len(jobs), seconds)


def _row(parsed: _Parsed, i: int, split: str, categorical: dict) -> dict:
    """Row `i` as `example` reads it (`categorical`: tabular modality -> [n, columns] codes)."""
    return {"index": int(i), "id": parsed.ids[i], "split": split,
            "present": {name: bool(v[i]) for name, v in parsed.present.items()},
            "text": {name: v[i] for name, v in parsed.texts.items()},
            "numeric": {name: v[i].astype(np.float32) for name, v in parsed.numeric.items()},
            "categorical": {name: v[i].astype(np.int32) for name, v in categorical.items()},
            "files": {name: parsed.keys[(name, p[i])] for name, p in parsed.paths.items() if p[i]},
            "labels": {name: (v[0][i], v[1][i]) for name, v in parsed.labels.items()}}


def category_codes(cells: list, vocab) -> np.ndarray:
    """Codes of categorical cells: 0 empty, 1 unseen in training, k + 2 for vocab[k]."""
    index = {c: k + 2 for k, c in enumerate(vocab)}
    return np.array([0 if not c else index.get(c, 1) for c in cells], np.int32)


def _strict_or_skip(bad: list, on_error: str, manifest: str, n: int) -> np.ndarray:
    """The rows kept: with `strict` the first problem (in file order) is raised, naming the row."""
    bad.sort(key=lambda b: b.row)
    if bad and on_error == "strict":
        more = f" ({len(bad) - 1} more problem(s); on_error: skip lists them all)" if len(bad) > 1 else ""
        raise DataError(bad[0].message(manifest) + more)
    drop = {b.row - 1 for b in bad}
    return np.array([i not in drop for i in range(n)])


def prepare(manifest: str, schema: Schema, cache_dir: str, *, fractions: dict, folds: int = 0, fold: int = 0,
            roots: tuple | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            text_min_patients: int = DEFAULT_TEXT_MIN_PATIENTS, workers: int | None = None, log=print) -> Prepared:
    """`roots`: the real paths of the folders files may be read from (default: the manifest's folder)."""
    df = read_table(manifest)
    check_columns(df, schema, manifest)
    base = os.path.dirname(os.path.abspath(manifest))
    n = len(df)
    if n == 0:
        raise DataError(f"manifest {manifest}: no rows")
    ids = df[schema.id].tolist()
    splits, bad = assign_splits(df, schema, fractions, folds, fold, manifest)
    bad = list(bad)
    train_rows = np.array([s == "train" for s in splits])

    def flag(i, column, reason, file=""):
        bad.append(BadCell(i + 1, ids[i], column, file, reason))

    parsed = _parse(df, schema, base, cache_dir, train_rows, flag, workers, log,
                    roots=roots or (os.path.realpath(base),), max_pixels=max_pixels)
    present, texts, numeric, paths = parsed.present, parsed.texts, parsed.numeric, parsed.paths
    categorical, labels, decoded = dict(parsed.categorical), parsed.labels, parsed.decoded

    # ---- bad rows ------------------------------------------------------------------------------
    keep = _strict_or_skip(bad, schema.on_error, manifest, n)
    drop = set(np.flatnonzero(~keep).tolist())
    train = keep & train_rows

    # ---- fit on the kept training rows ---------------------------------------------------------
    mods, unseen = [], {}
    for name, m in schema.modalities.items():
        field = f"modalities/{name}"
        if m["kind"] == "image":
            s1 = s2 = 0.0
            count = 0
            for i in np.flatnonzero(train & present[name]):
                a, b, c = decoded[(name, paths[name][i])][1]
                s1, s2, count = s1 + a, s2 + b, count + c
            if not count:
                raise DataError(f"modality {name!r}: no image in the training split to fit statistics on")
            mean = s1 / count
            std = np.sqrt(np.maximum(s2 / count - mean**2, 1e-12))
            mods.append(ModalitySpec(name, "image", field=field, shape=(m["size"], m["size"], m["channels"]),
                                     mean=mean.tolist(), std=std.tolist()))
        elif m["kind"] == "text":
            with_text = np.flatnonzero(train & present[name])
            train_texts = [texts[name][i] for i in with_text]
            if not train_texts:
                raise DataError(f"modality {name!r}: no text in the training split to fit a vocabulary on")
            tok = WordPieceTokenizer.fit(train_texts, patients=[ids[i] for i in with_text],
                                         min_patients=text_min_patients)
            lengths = length_histogram([len(tok.tokenize(t)) for t in train_texts])
            mods.append(ModalitySpec(name, "text", field=field, vocab=tok.vocab, length_counts=lengths))
        elif m["kind"] == "tabular":
            values = numeric[name]
            log_scale = np.array([c in m["log"] for c in m["numeric"]], bool)
            with np.errstate(invalid="ignore", divide="ignore"):
                logged = np.where(log_scale, np.log(values), values)
            mean, std = std_with_floor(logged[train], axis=0) if values.shape[1] else (np.zeros(0), np.zeros(0))
            cats, codes = [], []
            for col, cells in zip(m["categorical"], categorical[name]):
                vocab = sorted({cells[i] for i in np.flatnonzero(train) if cells[i]})
                code = category_codes(cells, vocab)
                for split in ("validation", "test"):
                    rows = keep & (np.array(splits) == split)
                    unseen.setdefault(name, {}).setdefault(col, {})[split] = int((code[rows] == 1).sum())
                cats.append(vocab)
                codes.append(code)
            categorical[name] = np.stack(codes, 1) if codes else np.zeros((n, 0), np.int32)
            mods.append(ModalitySpec(name, "tabular", field=field, numeric=m["numeric"], log_scale=log_scale.tolist(),
                                     mean=np.asarray(mean).tolist(), std=np.asarray(std).tolist(),
                                     categorical=m["categorical"], categories=cats))
        else:
            ch = m["channels"]
            names = tuple(str(c) for c in ch) if isinstance(ch, list) else ()
            length = int(round(m["rate"] * m["seconds"]))
            mods.append(ModalitySpec(name, "signal", field=field, shape=(length, len(ch) if names else int(ch)),
                                     rate=float(m["rate"]), channel_names=names))
    tasks = []
    for name, t in schema.tasks.items():
        y, known, classes = labels[name]
        rows = train & (known if known.ndim == 1 else known.any(axis=1))
        if t["kind"] == "regression":
            if rows.sum() < 2:
                raise DataError(f"task {name!r}: fewer than 2 known training labels")
            mean, std = std_with_floor(y[rows].astype(np.float64))
            tasks.append(TaskSpec(name, "regression", target_mean=float(mean), target_std=float(std)))
        elif t["kind"] == "multiclass":
            counts = np.bincount(y[rows].astype(np.int64), minlength=len(classes))
            tasks.append(TaskSpec(name, "multiclass", tuple(classes), class_counts=counts.tolist()))
        elif t["kind"] == "multilabel":
            counts = (y * known)[train].sum(axis=0)
            tasks.append(TaskSpec(name, "multilabel", tuple(classes), class_counts=counts.astype(int).tolist()))
        else:
            tasks.append(TaskSpec(name, "binary", class_counts=[int(y[rows].sum())]))
    sizes = collections.Counter(s for s, k in zip(splits, keep) if k)
    spec = DatasetSpec(schema.name, tuple(mods), tuple(tasks), {s: sizes.get(s, 0) for s in ("train", "validation",
                                                                                          "test")})
    rows = [_row(parsed, i, splits[i], categorical) for i in np.flatnonzero(keep)]
    summary = {"rows": n, "kept": int(keep.sum()), "skipped_rows": len(drop), "files": parsed.files,
               "splits": _split_summary(spec, schema, rows),
               "decode_seconds": round(parsed.seconds, 2),
               "files_per_second": round(parsed.files / parsed.seconds, 1) if parsed.files else None,
               "unseen_categories": unseen}
    return Prepared(spec, rows, bad, summary)


def prepare_new(manifest: str, schema: Schema, spec: DatasetSpec, cache_dir: str, *, modalities=None,
                roots: tuple | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None,
                log=print) -> Prepared:
    """New patients' rows, encoded with a trained run's `spec` (its categories, classes and statistics
    stay as fitted on its training split): the schema must describe `modalities` (the run's; default
    all of the spec's) and the spec's tasks as they were fitted; the manifest needs the id and the
    columns of `modalities`, other modalities' missing columns read as empty; label columns are
    optional (present ones are parsed; absent: no known label) and a split column is ignored. Bad rows
    are handled as in `prepare` (`schema.on_error`, files confined to `roots`, default the manifest's
    folder); categories unseen in training are encoded as such and counted in the summary. Every kept
    row gets split 'predict'."""
    used = set(modalities or spec.modality_names)
    _check_against_spec(schema, spec, used)
    df = read_table(manifest)
    columns = lambda m: [m["column"]] if "column" in m else m["numeric"] + m["categorical"]
    needed = [schema.id] + [c for name, m in schema.modalities.items() if name in used for c in columns(m)]
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        raise DataError(f"manifest {manifest}: missing column(s) {missing} named in the schema {schema.path}; "
                        f"it has {list(df.columns)}")
    for name, m in schema.modalities.items():
        if name not in used:  # a modality the run does not use: read as absent, its files never decoded
            for c in columns(m):
                df[c] = ""
    n = len(df)
    if n == 0:
        raise DataError(f"manifest {manifest}: no rows")
    ids = df[schema.id].tolist()
    bad = empty_ids(ids, schema.id)

    def flag(i, column, reason, file=""):
        bad.append(BadCell(i + 1, ids[i], column, file, reason))

    classes = {t.name: list(t.label_names) for t in spec.tasks}
    base = os.path.dirname(os.path.abspath(manifest))
    parsed = _parse(df, schema, base, cache_dir, np.zeros(n, bool), flag, workers, log,
                    roots=roots or (os.path.realpath(base),), max_pixels=max_pixels, classes=classes)
    keep = _strict_or_skip(bad, schema.on_error, manifest, n)
    codes, unseen = {}, {}
    for name, m in schema.modalities.items():
        if m["kind"] != "tabular":
            continue
        ms = spec.modality(name)
        cols = [category_codes(cells, vocab) for cells, vocab in zip(parsed.categorical[name], ms.categories)]
        codes[name] = np.stack(cols, 1) if cols else np.zeros((n, 0), np.int32)
        unseen[name] = {col: int((c[keep] == 1).sum()) for col, c in zip(m["categorical"], cols)}
    rows = [_row(parsed, i, "predict", codes) for i in np.flatnonzero(keep)]
    labelled = {t: bool(v[1][keep].any()) for t, v in parsed.labels.items()}
    summary = {"rows": n, "kept": int(keep.sum()), "skipped_rows": int((~keep).sum()), "files": parsed.files,
               "decode_seconds": round(parsed.seconds, 2), "unseen_categories": unseen,
               "present": {m: int(v[keep].sum()) for m, v in parsed.present.items()}, "labelled": labelled}
    return Prepared(spec, rows, bad, summary)


def _check_against_spec(schema: Schema, spec: DatasetSpec, used: set) -> None:
    """The schema describes the run's modalities (`used`) as they were fitted (same kinds, columns and
    shapes; others of its dataset may be left out) and the run's tasks (same names and kinds)."""
    lacking = sorted(used - set(schema.modalities))
    if lacking:
        raise DataError(f"schema {schema.path}: lacks the run's modality {lacking[0]!r} (modalities.{lacking[0]}); "
                        f"the schema the run was trained with is its workdir's schema.yaml")
    for name, m in schema.modalities.items():
        if name not in spec.modality_names:
            raise DataError(f"schema {schema.path}: modality {name!r} is not one of the run's "
                            f"{list(spec.modality_names)}")
        ms = spec.modality(name)
        if m["kind"] == "image":
            fitted, given = tuple(ms.shape), (m["size"], m["size"], m["channels"])
        elif m["kind"] == "tabular":
            fitted = (list(ms.numeric), list(ms.categorical), [c for c, lg in zip(ms.numeric, ms.log_scale) if lg])
            given = (m["numeric"], m["categorical"], [c for c in m["numeric"] if c in m["log"]])
        elif m["kind"] == "signal":
            length = int(round(m["rate"] * m["seconds"]))
            ch = m["channels"]
            fitted = (tuple(ms.shape), float(ms.rate), tuple(ms.channel_names))
            given = ((length, len(ch) if isinstance(ch, list) else int(ch)), float(m["rate"]),
                     tuple(str(c) for c in ch) if isinstance(ch, list) else ())
        else:
            fitted = given = m["kind"]
        if ms.kind != m["kind"] or fitted != given:
            raise DataError(f"schema {schema.path}: modality {name!r} is {m['kind']} {given} but the run's was "
                            f"fitted as {ms.kind} {fitted}")
    fitted_tasks = {t.name: t.kind for t in spec.tasks}
    for name, t in schema.tasks.items():
        if name not in fitted_tasks:
            raise DataError(f"schema {schema.path}: task {name!r} (tasks.{name}) is not one of the run's tasks "
                            f"{list(fitted_tasks)}")
        if t["kind"] != fitted_tasks[name]:
            raise DataError(f"schema {schema.path}: task {name!r} is {t['kind']} (tasks.{name}.kind) but the run's "
                            f"is {fitted_tasks[name]}")
    lacking = [t for t in fitted_tasks if t not in schema.tasks]
    if lacking:
        raise DataError(f"schema {schema.path}: lacks the run's task {lacking[0]!r} (tasks.{lacking[0]})")


def example(row: dict, spec: DatasetSpec) -> dict:
    """One kept row as a TFDS example of the manifest builder's features. A modality the row lacks (one a
    new patients' schema leaves out, unused by the run) is written absent."""
    mods = {}
    for m in spec.modalities:
        name = m.name
        if m.kind == "image":
            path = row["files"].get(name)
            mods[name] = np.load(path) if path else np.zeros(m.shape, np.uint8)
        elif m.kind == "signal":
            path = row["files"].get(name)
            mods[name] = np.load(path).astype(np.float32) if path else np.zeros((0, m.shape[1]), np.float32)
        elif m.kind == "text":
            mods[name] = row["text"].get(name, "")
        else:
            parts = {}
            if m.numeric:
                parts["numeric"] = row["numeric"].get(name, np.full(len(m.numeric), np.nan, np.float32))
            if m.categorical:
                parts["categorical"] = row["categorical"].get(name, np.zeros(len(m.categorical), np.int32))
            mods[name] = parts
    labels, known = {}, {}
    for t in spec.tasks:
        y, k = row["labels"][t.name]
        labels[t.name] = np.asarray(y, np.int64 if t.kind == "multiclass" else np.float32)
        known[t.name] = np.asarray(k, bool)
    present = {m.name: row["present"].get(m.name, False) for m in spec.modalities}
    return {"patient_id": row["id"], "row": row["index"] + 1, "present": present, "modalities": mods,
            "labels": labels, "label_known": known}


def _split_summary(spec: DatasetSpec, schema: Schema, rows: list) -> dict:
    """Per split: examples, presence per modality, label distribution, numeric ranges."""
    out = {}
    for split in ("train", "validation", "test"):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        info = {"examples": len(rs),
                "present": {m: round(float(np.mean([r["present"][m] for r in rs])), 4) for m in schema.modalities},
                "labels": {}, "numeric": {}}
        for t in spec.tasks:
            y = np.stack([np.asarray(r["labels"][t.name][0], np.float64) for r in rs])
            k = np.stack([np.asarray(r["labels"][t.name][1], bool) for r in rs])
            if t.kind == "regression":
                v = y[k]
                info["labels"][t.name] = {"known": int(k.sum()), "mean": round(float(v.mean()), 4) if v.size else None,
                                          "min": float(v.min()) if v.size else None,
                                          "max": float(v.max()) if v.size else None}
            elif t.kind == "multiclass":
                counts = np.bincount(y[k].astype(np.int64), minlength=t.num_outputs)
                info["labels"][t.name] = {"known": int(k.sum()), **dict(zip(t.label_names, counts.tolist()))}
            elif t.kind == "multilabel":
                info["labels"][t.name] = {"known": int(k.any(axis=1).sum()),
                                          **dict(zip(t.label_names, (y * k).sum(0).astype(int).tolist()))}
            else:
                info["labels"][t.name] = {"known": int(k.sum()), "positive": int(y[k].sum())}
        for m in spec.modalities:
            if m.kind == "tabular":
                values = np.stack([r["numeric"][m.name] for r in rs]) if m.numeric else np.zeros((len(rs), 0))
                for j, col in enumerate(m.numeric):
                    v = values[:, j][np.isfinite(values[:, j])]
                    info["numeric"][col] = {"missing": round(float(1 - v.size / len(rs)), 4),
                                            "min": float(v.min()) if v.size else None,
                                            "max": float(v.max()) if v.size else None}
        out[split] = info
    return out


def write_skipped(path: str, skipped) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "id", "column", "file", "reason"])
        for b in skipped:
            w.writerow([b.row, b.id, b.column, b.file, b.reason])
