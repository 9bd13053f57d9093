r"""Any manifest dataset (`mmjax/data/manifest`): a CSV/TSV/JSONL/Parquet manifest plus a YAML schema.

    python -m mmjax.data.manifest --manifest=M --schema=S          # validate, prepare, summarize
    python launch.py --config=experiments/manifest.py --config.data.manifest=M --config.data.schema=S \
        --workdir=workdirs/mystudy
    python launch.py --config=experiments/manifest.py:fusion=concat,modalities=cxr+labs ... # variants
    python launch.py --config=experiments/manifest.py ... --config.data.folds=5 --config.data.fold=2

Arguments after the colon: `fusion=`, `modalities=` (the schema's modality names, '+'-separated;
default all), `smoke` (a few steps, for tests). Every option of the default experiment is here
(`experiments/synthetic_patients.py`); the data block adds `manifest`, `schema`, `split_fractions`
('train=0.8,validation=0.1,test=0.1', used without a split column), `folds`/`fold` (patient-level
k-fold), `on_error` (strict / skip, overrides the schema's), `prepare_workers` (default: all cores),
`public` + `source_dir` (a converter of `mmjax.data.public` writes the manifest from a public
dataset's own files; see experiments/vqa_rad.py).
Task weights: `--config.loss.weights=dx=1,los=0.2` (default 1 each); class weights of a multiclass
task: `--config.loss.class_weights=dx=balanced`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_patients import base_config, parse_arg  # noqa: E402

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def manifest_config(fusion="cross_attention", modalities="", manifest="", schema=""):
    """`base_config` with a manifest data block: what every real-data experiment starts from."""
    c = base_config(fusion, modalities)
    c.data = dict(name="manifest", config="", manifest=manifest, schema=schema, data_dir="", public="",
                  source_dir="", split_fractions="train=0.8,validation=0.1,test=0.1", folds=0, fold=0, on_error="",
                  prepare_workers=0, text_max_length=64, spectrogram=False, augment=True, worker_count=0,
                  signal_eval_windows=0)
    c.train.update(num_steps=1000, eval_every=250, checkpoint_every=250)
    return c


def smoke(c):
    """A few steps at small width: for tests."""
    c.model.update(width=32, num_heads=2)
    c.model.fusion.depth = 1
    c.train.update(batch_size=16, num_steps=4, log_every=2, eval_every=2, checkpoint_every=2, figures=False)
    c.optimizer.warmup_steps = 1
    c.eval_batch_size = 16
    c.eval.bootstrap_resamples = 50
    return c


def public_config(public: str, folder: str, arg, **variants):
    """A real-data experiment: the converter `mmjax.data.public.<public>` on `../shared/data/<folder>`
    (or `--config.data.source_dir`), with `arg` parsed for fusion=, modalities= and smoke."""
    opts = parse_arg(arg, {"fusion": "cross_attention", "modalities": "", **variants})
    c = manifest_config(opts["fusion"], opts["modalities"])
    c.data.public = public
    c.data.source_dir = os.path.join(SHARED_DATA, folder)
    return c, opts


def get_config(arg=None):
    opts = parse_arg(arg, {"fusion": "cross_attention", "modalities": ""})
    c = manifest_config(opts["fusion"], opts["modalities"])
    return smoke(c) if opts["smoke"] else c
