"""Validates a manifest and its schema, prepares the dataset and prints its summary.

    python -m mmjax.data.manifest --manifest=M --schema=S [--data_dir=D] [--folds=5 --fold=0] [--on_error=skip]
        [--allowed_roots=/data/images,/data/notes] [--max_pixels=0] [--text_min_patients=5]
"""

from __future__ import annotations

import json

from absl import app, flags

from mmjax.console import run
from mmjax.data.manifest import builder as manifest_builder
from mmjax.data.manifest.summary import format_summary
from mmjax.data.spec import DatasetSpec

_MANIFEST = flags.DEFINE_string("manifest", None, "CSV, TSV, JSONL or Parquet file, one row per example.",
                                required=True)
_SCHEMA = flags.DEFINE_string("schema", None, "YAML schema (mmjax/data/manifest/schema.py).", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $MMJAX_DATA_DIR or ~/tensorflow_datasets).")
_FRACTIONS = flags.DEFINE_string("split_fractions", "", "train=0.8,validation=0.1,test=0.1 (no split column).")
_FOLDS = flags.DEFINE_integer("folds", 0, "Patient-level k-fold cross-validation: the number of folds.")
_FOLD = flags.DEFINE_integer("fold", 0, "Which fold is held out (0-based).")
_ON_ERROR = flags.DEFINE_enum("on_error", None, ["strict", "skip"], "Overrides the schema's on_error.")
_ROOTS = flags.DEFINE_string("allowed_roots", "", "Comma-separated folders the manifest's files may be in "
                             "(default: the manifest's folder).")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", manifest_builder.DEFAULT_MAX_PIXELS,
                                   "An image with more pixels is a bad row (0: no cap).")
_MIN_PATIENTS = flags.DEFINE_integer("text_min_patients", manifest_builder.DEFAULT_TEXT_MIN_PATIENTS,
                                     "A word enters a text vocabulary only from the notes of this many patients.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding processes (default: all cores).")
_ECG_RATE = flags.DEFINE_float("ecg_rate", 100, "An ECG above this rate (Hz) is prepared at it, as training's "
                               "data.ecg_rate does (0: the schema's rate).")
_JSON = flags.DEFINE_string("json", None, "Also write the summary to this JSON file.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fractions = manifest_builder.split_fractions(_FRACTIONS.value)
    builder = manifest_builder.load(_MANIFEST.value, _SCHEMA.value, _DATA_DIR.value, fractions=fractions,
                                    folds=_FOLDS.value, fold=_FOLD.value, on_error=_ON_ERROR.value,
                                    allowed_roots=_ROOTS.value, max_pixels=_MAX_PIXELS.value,
                                    text_min_patients=_MIN_PATIENTS.value,
                                    workers=_WORKERS.value or None, ecg_rate=_ECG_RATE.value)
    spec = DatasetSpec.from_builder(builder)
    summary = dict(builder.info.metadata["summary"])
    print(format_summary(spec, summary, builder.data_dir))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"spec": spec.to_metadata(), "summary": summary}, f, indent=1)


if __name__ == "__main__":
    run(main)
