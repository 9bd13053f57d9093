"""The manifest TFDS builder: array_record files read by Grain, no TensorFlow.

    builder = load("study/manifest.csv", "study/schema.yaml", data_dir=D)   # prepares or reuses
    spec = DatasetSpec.from_builder(builder)

The dataset is `manifest/<schema name>[_fold<k>of<n>]-<key>/1.0.0` under the data dir, where the key
is a hash of everything the preparation depends on but the referenced files: the manifest (path and
contents), the schema, the split settings, `on_error`, the input settings (`allowed_roots`,
`max_pixels`, `text_min_patients`) and the preparation's version. So two runs with other settings
each have their own folder and never rebuild each other's; a referenced file that changed (size or
modification time) rebuilds that folder in place, with a message saying what changed. A file lock
makes a second process preparing the same dataset wait and then reuse it; the leftovers of a
killed preparation are removed by the next. Rows left out with `on_error: skip` are listed in
`skipped_rows.csv` next to the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from mmjax.config import parse_mapping
from mmjax.console import quiet_absl
from mmjax.data.local_info import LocalDatasetInfo, LocalPreparation, config_dir, preparing
from mmjax.data.manifest import readers
from mmjax.data.manifest.prepare import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_TEXT_MIN_PATIENTS,
    example,
    prepare,
    write_skipped,
)
from mmjax.data.manifest.schema import Schema, cap_ecg_rate, load_schema
from mmjax.data.manifest.table import read_table
from mmjax.data.spec import DEFAULT_DATA_DIR, SPEC_FORMAT, DataError

DEFAULT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
INPUTS_FILE = "inputs.json"
KEY_LENGTH = 10  # hex digits of the settings' SHA-256 in a prepared dataset's folder name
SKIPPED_FILE = "skipped_rows.csv"
# bump when preparation changes what it writes (1.1: confined paths, inline '.txt' notes, the pixel cap,
# vocabularies from text_min_patients patients)
PREPARE_VERSION = f"1.1/spec{SPEC_FORMAT}"


class ManifestConfig(tfds.core.BuilderConfig):
    """A manifest, its schema, the split settings and the input settings: `roots` (the real paths of the
    folders files may be read from), `max_pixels` (0: no cap), `text_min_patients`."""

    def __init__(self, *, manifest: str, schema: Schema, fractions: dict, folds: int = 0, fold: int = 0,
                 roots: tuple = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                 text_min_patients: int = DEFAULT_TEXT_MIN_PATIENTS, workers: int | None = None, log=print,
                 ecg_rate: float = 0):
        self.manifest, self.schema = os.path.abspath(manifest), schema
        self.ecg_rate = ecg_rate  # the schema given is already capped (`cap_ecg_rate`); 0 or nothing capped: none
        self.fractions, self.folds, self.fold, self.workers = dict(fractions), folds, fold, workers
        self.roots = tuple(roots) or parse_roots("", manifest)
        self.max_pixels, self.text_min_patients = max_pixels, text_min_patients
        self.log = log
        self.manifest_sha256, self.schema_sha256 = _sha256(self.manifest), _sha256(schema.path)
        key = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]
        name = schema.name + (f"_fold{fold}of{folds}" if folds > 1 else "") + f"-{key}"
        super().__init__(name=name, version=tfds.core.Version("1.0.0"),
                         description=f"Manifest dataset from {manifest} with schema {schema.path}")

    def settings(self) -> dict:
        """Everything the prepared data depends on but the referenced files' contents: its folder's key."""
        return {"prepared_by": PREPARE_VERSION, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
                "schema_sha256": self.schema_sha256, "on_error": self.schema.on_error,
                "fractions": self.fractions, "folds": self.folds, "fold": self.fold, "allowed_roots": list(self.roots),
                "max_pixels": self.max_pixels, "text_min_patients": self.text_min_patients,
                **({"ecg_rate": self.ecg_rate} if self.ecg_rate else {})}


class Manifest(LocalPreparation, tfds.core.GeneratorBasedBuilder):
    """A dataset described by a manifest and a schema (`mmjax.data.manifest.schema`)."""

    VERSION = tfds.core.Version("1.0.0")
    SOURCE = "a manifest"

    def _log_download_bytes(self) -> None:  # `load` says what it prepares, from which manifest
        return None
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = []  # made at run time from a manifest and its schema

    def __init__(self, *, config: ManifestConfig, file_format=None, **kwargs):
        # array_record, not TFDS's tfrecord default: tfrecord needs TensorFlow.
        super().__init__(config=config, file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.schema
        f = tfds.features
        mods = {}
        for name, m in s.modalities.items():
            if m["kind"] == "image":
                mods[name] = f.Tensor(shape=(m["size"], m["size"], m["channels"]), dtype=np.uint8, encoding="bytes")
            elif m["kind"] == "text":
                mods[name] = f.Text()
            elif m["kind"] == "signal":
                ch = m["channels"]
                mods[name] = f.Tensor(shape=(None, len(ch) if isinstance(ch, list) else int(ch)), dtype=np.float32,
                                      encoding="bytes")
            else:
                parts = {}
                if m["numeric"]:
                    parts["numeric"] = f.Tensor(shape=(len(m["numeric"]),), dtype=np.float32, encoding="bytes")
                if m["categorical"]:
                    parts["categorical"] = f.Tensor(shape=(len(m["categorical"]),), dtype=np.int32, encoding="bytes")
                mods[name] = parts
        labels, known = {}, {}
        for name, t in s.tasks.items():
            if t["kind"] == "multilabel":
                k = len(t.get("columns") or t["classes"])
                labels[name] = f.Tensor(shape=(k,), dtype=np.float32)
                known[name] = f.Tensor(shape=(k,), dtype=np.bool_)
            else:
                labels[name] = f.Scalar(dtype=np.int64 if t["kind"] == "multiclass" else np.float32)
                known[name] = f.Scalar(dtype=np.bool_)
        return LocalDatasetInfo(
            builder=self, description=self.builder_config.description,
            features=f.FeaturesDict({
                "patient_id": f.Text(), "row": f.Scalar(dtype=np.int64),
                "present": {name: f.Scalar(dtype=np.bool_) for name in s.modalities},
                "modalities": mods, "labels": labels, "label_known": known,
            }),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        os.makedirs(self.data_dir_root, exist_ok=True)
        # beside the data, not in /tmp; removed after, or by the next preparation if this one is killed
        cache = tempfile.mkdtemp(prefix=".decoded-", dir=config_dir(self))
        self._cache = cache
        prepared = prepare(cfg.manifest, cfg.schema, cache, fractions=cfg.fractions, folds=cfg.folds, fold=cfg.fold,
                           roots=cfg.roots, max_pixels=cfg.max_pixels, text_min_patients=cfg.text_min_patients,
                           workers=cfg.workers, log=cfg.log)
        self.prepared = prepared
        self.info.metadata.update({**prepared.spec.to_metadata(), "summary": prepared.summary})
        splits = {}
        for split in ("train", "validation", "test"):
            rows = [r for r in prepared.rows if r["split"] == split]
            if rows:
                splits[split] = self._generate_examples(rows, prepared.spec)
        return splits

    def _generate_examples(self, rows, spec):
        for row in rows:
            yield row["index"], example(row, spec)


def referenced_files(manifest: str, schema: Schema) -> dict:
    """{path: [size, mtime_ns]} of every file the manifest's image, signal and text cells name."""
    df = read_table(manifest)
    base = os.path.dirname(os.path.abspath(manifest))
    out = {}
    for m in schema.modalities.values():
        if "column" not in m or m["column"] not in df.columns:
            continue
        for cell in df[m["column"]].tolist():
            if m["kind"] == "text":  # a note is not a file (nor kept here); a .txt file it names is
                path = readers.text_path(cell, base, m.get("file")) if cell else None
                files = [path] if path else []
            else:
                files = readers.files_read(readers.resolve(cell, base), m["kind"]) if cell else []
            for path in files:  # with a WFDB record, the header and data files the cell does not name
                try:
                    st = os.stat(path)
                    out[path] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    out[path] = None
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def inputs_of(cfg: ManifestConfig) -> dict:
    return {**cfg.settings(), "schema": cfg.schema.path, "files": referenced_files(cfg.manifest, cfg.schema)}


def changes(old: dict, new: dict) -> list[str]:
    """What differs between the inputs a dataset was prepared from and today's, in words."""
    out = []
    if old.get("prepared_by") != new["prepared_by"]:
        out.append(f"it was prepared by another version of mmjax's preparation ({old.get('prepared_by')} -> "
                   f"{new['prepared_by']})")
    if old.get("manifest_sha256") != new["manifest_sha256"]:
        out.append(f"the manifest {new['manifest']} changed")
    if old.get("schema_sha256") != new["schema_sha256"]:
        out.append(f"the schema {new['schema']} changed")
    for key in ("on_error", "fractions", "folds", "fold", "allowed_roots", "max_pixels", "text_min_patients",
                "ecg_rate"):
        if old.get(key) != new.get(key):
            out.append(f"{key} changed ({old.get(key)} -> {new.get(key)})")
    before, now = old.get("files", {}), new["files"]
    changed = sorted(p for p in now if p in before and before[p] != now[p])
    added = sorted(set(now) - set(before))
    if changed:
        out.append(f"{len(changed)} referenced file(s) changed (first: {changed[0]})")
    if added and not out:
        out.append(f"{len(added)} file(s) newly referenced (first: {added[0]})")
    return out


def load(manifest: str, schema_path: str, data_dir: str | None = None, *, fractions: dict | None = None,
         folds: int = 0, fold: int = 0, on_error: str | None = None, allowed_roots: str = "",
         max_pixels: int = DEFAULT_MAX_PIXELS, text_min_patients: int = DEFAULT_TEXT_MIN_PATIENTS,
         workers: int | None = None, ecg_rate: float = 0, log=print):
    """The prepared manifest builder: reused when its inputs are unchanged, else (re)built.
    `allowed_roots`: comma-separated folders files may be read from (empty: the manifest's folder);
    `ecg_rate` > 0: ECG modalities above it prepared at it (`schema.cap_ecg_rate`)."""
    if not os.path.isfile(manifest):
        raise DataError(f"manifest {manifest}: file not found")
    if max_pixels < 0 or text_min_patients < 1:
        raise DataError(f"max_pixels={max_pixels} (0: no cap) must be >= 0 and text_min_patients="
                        f"{text_min_patients} >= 1")
    schema, capped = cap_ecg_rate(load_schema(schema_path, manifest, on_error), ecg_rate)
    for name, before in capped.items():
        log(f"ECG {name!r}: {before:g} Hz in the schema, prepared at {ecg_rate:g} Hz (data.ecg_rate; 0 keeps the "
            "schema's rate)")
    cfg = ManifestConfig(manifest=manifest, schema=schema, fractions=fractions or DEFAULT_FRACTIONS, folds=folds,
                         fold=fold, roots=parse_roots(allowed_roots, manifest), max_pixels=max_pixels,
                         text_min_patients=text_min_patients, workers=workers, log=log,
                         ecg_rate=float(ecg_rate) if capped else 0)
    data_dir = data_dir or DEFAULT_DATA_DIR
    tfds.disable_progress_bar()
    with preparing(_builder(cfg, data_dir)):  # one preparation at a time; an interrupted one's files removed
        return _reuse_or_prepare(cfg, data_dir, manifest, log)


def _reuse_or_prepare(cfg: ManifestConfig, data_dir: str, manifest: str, log) -> Manifest:
    builder = _builder(cfg, data_dir)
    inputs = inputs_of(cfg)
    stamp = os.path.join(builder.data_dir, INPUTS_FILE)
    if os.path.exists(stamp):
        with open(stamp) as f:
            why = changes(json.load(f), inputs)
        if not why:
            return builder
        log(f"Rebuilding {builder.name}/{cfg.name} in {builder.data_dir}: " + "; ".join(why))
        shutil.rmtree(builder.data_dir)
        builder = _builder(cfg, data_dir)
    elif os.path.isdir(builder.data_dir):
        shutil.rmtree(builder.data_dir)  # an interrupted or foreign preparation: start over
        builder = _builder(cfg, data_dir)
    log(f"Preparing {builder.name}/{cfg.name} from {manifest} into {builder.data_dir}")
    start = time.perf_counter()
    try:
        builder.download_and_prepare(file_format="array_record")
    finally:
        cache = getattr(builder, "_cache", None)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    seconds = time.perf_counter() - start
    prepared = builder.prepared
    s = prepared.summary
    rate = f" at {s['files_per_second']:.0f} files/s" if s.get("files_per_second") else ""
    log(f"Prepared {s['kept']} of {s['rows']} rows in {seconds:.1f} s ({s['rows'] / seconds:.0f} rows/s; "
        f"{s['files']} files decoded in {s['decode_seconds']:.1f} s{rate})")
    write_skipped(os.path.join(builder.data_dir, SKIPPED_FILE), prepared.skipped)
    if prepared.skipped:
        log(f"Skipped {s['skipped_rows']} row(s) ({len(prepared.skipped)} problem(s)); each with its reason in "
            f"{os.path.join(builder.data_dir, SKIPPED_FILE)}")
    with open(stamp, "w") as f:
        json.dump(inputs, f)
    return builder


def _builder(cfg: ManifestConfig, data_dir: str) -> Manifest:
    with quiet_absl():  # TFDS warns "Using custom data configuration": every manifest builder does
        return Manifest(config=cfg, data_dir=data_dir)


def parse_roots(text: str, manifest: str) -> tuple[str, ...]:
    """'a,b' -> the real paths of those folders (relative to the current directory); empty: the manifest's folder."""
    folders = [f.strip() for f in text.split(",") if f.strip()] or [os.path.dirname(os.path.abspath(manifest))]
    roots = tuple(dict.fromkeys(os.path.realpath(os.path.expanduser(f)) for f in folders))
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        raise DataError(f"allowed_roots: {missing[0]}: no such folder")
    return roots


def split_fractions(text: str) -> dict | None:
    """'train=0.8,validation=0.1,test=0.1' -> {split: fraction}; empty: None (the defaults)."""
    return {k: float(v) for k, v in parse_mapping(text, "split_fractions").items()} or None
