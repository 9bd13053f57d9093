r"""Any manifest dataset (`mmjax/data/manifest`): a CSV/TSV/JSONL/Parquet manifest plus a YAML schema.

    python -m mmjax.data.manifest --manifest=M --schema=S          # validate, prepare, summarize
    python launch.py --config=experiments/manifest.py --config.data.manifest=M --config.data.schema=S \
        --workdir=workdirs/mystudy
    python launch.py --config=experiments/manifest.py:fusion=concat,modalities=cxr+labs ... # variants
    python launch.py --config=experiments/manifest.py ... --config.data.folds=5 --config.data.fold=2

Arguments after the colon: `fusion=`, `modalities=` (the schema's modality names, '+'-separated;
default all), `smoke` (a few steps, for tests). Every option of the default experiment is here
(`base_config` in experiments/common.py); the data block (`manifest_config` there) adds `manifest`,
`schema`, `split_fractions` ('train=0.8,validation=0.1,test=0.1', used without a split column),
`folds`/`fold` (patient-level k-fold), `on_error` (strict / skip, overrides the schema's),
`allowed_roots`, `max_pixels` and `text_min_patients` (docs/own_data.md), `prepare_workers`
(default: all cores), `public` + `source_dir` (a converter of `mmjax.data.public`
writes the manifest from a public dataset's own files; see experiments/vqa_rad.py).
Task weights: `--config.loss.weights=dx=1,los=0.2` (default 1 each); class weights of a multiclass
task: `--config.loss.class_weights=dx=balanced`.
"""

from experiments.common import manifest_config, parse_arg, smoke


def get_config(arg=None):
    opts = parse_arg(arg, {"fusion": "cross_attention", "modalities": ""})
    c = manifest_config(opts["fusion"], opts["modalities"])
    return smoke(c) if opts["smoke"] else c
