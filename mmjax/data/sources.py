"""Where a dataset comes from: the one module that knows the kinds of dataset an experiment can name.

    builder = builder_from_config(config.data)   # prepared if needed

- a registered TFDS dataset (`data.name`, `data.config`: `synthetic_patients/default`);
- a manifest dataset (`data.manifest` + `data.schema`, `mmjax/data/manifest`);
- a public dataset converted to a manifest first (`data.public` + `data.source_dir`,
  `mmjax/data/public`).
"""

from __future__ import annotations

import importlib
import os

import tensorflow_datasets as tfds

from mmjax.data import local_info
from mmjax.data.manifest import builder as manifest_builder
from mmjax.data.spec import DEFAULT_DATA_DIR, DataError


def load_builder(name: str = "synthetic_patients", data_dir: str | None = None, prepare: bool = True):
    """The registered TFDS builder `name` (e.g. 'synthetic_patients/tiny'), prepared if needed."""
    import mmjax.data.synthetic  # noqa: F401  (registers the builder)

    builder = tfds.builder(name, data_dir=data_dir or DEFAULT_DATA_DIR)
    if prepare and not builder.is_prepared():
        tfds.disable_progress_bar()  # seconds of work: a line says what is prepared (`LocalPreparation`)
        with local_info.preparing(builder):  # one process prepares, the others wait and reuse it
            builder = tfds.builder(name, data_dir=data_dir or DEFAULT_DATA_DIR)
            builder.download_and_prepare(file_format="array_record")
    return builder


def define_dataset_flags() -> None:
    """`--dataset` and `--data_dir`: a registered dataset, for the commands that read one."""
    from absl import flags

    flags.DEFINE_string("dataset", "synthetic_patients", "TFDS name, optionally with /config.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $MMJAX_DATA_DIR or ~/tensorflow_datasets).")


def builder_from_config(data):
    """The prepared builder an experiment's `config.data` names."""
    manifest, schema = data.get("manifest"), data.get("schema")
    roots = data.get("allowed_roots", "")
    if data.get("public"):  # the converter writes the manifest and schema from the dataset's own files
        converter = importlib.import_module(f"mmjax.data.public.{data.public}")
        source = os.path.abspath(os.path.expanduser(data.source_dir))
        if not os.path.isdir(source):
            raise DataError(f"--config.data.source_dir={data.source_dir}: no such folder (the {data.public} files)")
        out = os.path.join(data.get("data_dir") or DEFAULT_DATA_DIR, "manifests", data.public)
        manifest, schema = converter.write_manifest(source, out)
        roots = roots or f"{out},{source}"  # its manifest points into the dataset's folder
    elif data.get("name") == "manifest" or manifest or schema:
        if not manifest:
            raise DataError("--config.data.manifest is not set: the manifest experiment needs a manifest file "
                            "(CSV, TSV, JSONL or Parquet) and --config.data.schema (docs/own_data.md)")
        if not schema:
            raise DataError(f"--config.data.schema is not set: the manifest {manifest} needs a YAML schema "
                            "(docs/own_data.md)")
    else:
        name = f"{data.name}/{data.config}" if data.get("config") else data.name
        return load_builder(name, data.data_dir or None)
    fractions = manifest_builder.split_fractions(data.get("split_fractions", ""))
    folds, fold = int(data.get("folds", 0) or 0), int(data.get("fold", 0))
    if folds > 1 and fold < 0:
        raise DataError(f"--config.data.folds={folds} with no --config.data.fold is the whole cross-validation, "
                        "which `python launch.py` runs (mmjax/training/cv.py); one fold's data needs a fold in "
                        f"[0, {folds})")
    return manifest_builder.load(manifest, schema, data.get("data_dir") or None, fractions=fractions,
                                 folds=folds, fold=max(fold, 0) if folds > 1 else 0,
                                 on_error=data.get("on_error") or None, allowed_roots=roots,
                                 max_pixels=int(data.get("max_pixels", manifest_builder.DEFAULT_MAX_PIXELS)),
                                 text_min_patients=int(data.get("text_min_patients",
                                                                manifest_builder.DEFAULT_TEXT_MIN_PATIENTS)),
                                 workers=int(data.get("prepare_workers", 0)) or None,
                                 ecg_rate=float(data.get("ecg_rate", 0) or 0))
