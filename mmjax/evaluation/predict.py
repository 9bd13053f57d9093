"""Predictions for new patients from a trained workdir.

    python launch.py --workdir=W --mode=predict --manifest=new.csv [--output=P.csv] [--calibrated]

The manifest follows the schema the run was trained with (copied to `W/schema.yaml` at training
time; `--schema` overrides it): the id and the modalities' columns are needed, label columns and a
split column are not. Rows are parsed and checked as in preparation (`on_error` of the schema, or
`--on_error`): with `strict` the first bad row is an error naming its row, column and file; with
`skip` bad rows are left out and listed in `skipped_rows.csv` beside the predictions. Images,
text, tabular values and signals are encoded with the run's own statistics, vocabularies and
categories (`W/dataset_spec.json`); a category unseen in training is encoded as unseen and counted.

`predictions.csv` has one row per kept manifest row:
- `row` (1-based, in the manifest's order), `id` and `present` (the run's modalities the row has,
  ';'-separated: empty means a prediction from no input at all);
- per binary task `T.probability` and `T.prediction` (1 when the probability reaches the
  operating-point threshold); per multilabel task the same per label (`T.label.probability`, ...);
  per multiclass task `T.class.probability` for each class and `T.prediction` (the most probable
  class); per regression task `T.value`;
- per task `T.top_modality` and `T.top_shapley`: the modality with the largest absolute exact
  Shapley value (over modalities, by masking: `mmjax/evaluation/robustness.py`) on the task's output
  (a binary task's probability, a multiclass task's predicted-class probability, a regression's
  value; for a multilabel task the sum of absolute values over its labels), and that value. An
  absent modality's Shapley value is exactly 0 (empty when all are: no modality present). Left out
  with more than 6 modalities, or with `shapley=False` (`--shapley=false`: one pass instead of 2^M);
- the labels the manifest gives, if any (`T.label`).

Thresholds are the operating points chosen on validation at evaluation (`W/eval/test.json` or
`validation.json`; evaluated first if neither exists). `--calibrated` divides each binary or
multilabel task's logit, or a multiclass task's log-probabilities, by the task's validation
temperature (`mmjax/metrics/calibration.py`); the decisions are taken on the unscaled
probabilities at the unscaled thresholds (the ones in `predictions.json`), the same decisions as
at the scaled threshold, and `T.top_shapley` stays on the unscaled probability. An output whose
threshold could not be chosen on validation (one class only there) gets no `.prediction` column.
`predictions.json` beside the CSV says what was used and counted.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from mmjax.data.manifest.builder import parse_roots
from mmjax.data.manifest.prepare import DEFAULT_MAX_PIXELS, example, prepare_new, write_skipped
from mmjax.data.manifest.schema import cap_ecg_rate, load_schema
from mmjax.data.spec import DataError
from mmjax.evaluation import robustness
from mmjax.evaluation.evaluate import evaluate_split
from mmjax.evaluation.predictor import Predictor
from mmjax.evaluation.records import dump_json, load_eval
from mmjax.experiment import EVAL_DIR, SCHEMA_FILE
from mmjax.metrics import calibration


def operating_points(run: Predictor) -> tuple[dict, dict, str]:
    """({output: threshold}, {task: temperature}, file): fitted on validation at evaluation, read from
    `W/eval/test.json` (fitted on the validation reference) or `validation.json` of the same checkpoint;
    if neither exists, the validation split is evaluated first (which needs the run's dataset)."""
    rec, name = None, ""
    for name in ("test.json", "validation.json"):
        rec = load_eval(run.workdir, name, run.step)
        if rec is not None and (rec.get("fitted_on") == "reference" or rec.get("split") == "validation"):
            break
        rec = None
    if rec is None:
        rec, name = evaluate_split(run, "validation"), "validation.json"
    finite = lambda v: v is not None and np.isfinite(v)
    thresholds = {k: v["threshold"] for k, v in rec.get("operating_points", {}).items() if finite(v.get("threshold"))}
    temperatures = {k: v for k, v in rec.get("temperature", {}).items() if finite(v)}
    return thresholds, temperatures, os.path.join(run.workdir, EVAL_DIR, name)


def predict(run: Predictor, manifest: str, output: str | None = None, *, schema: str | None = None,
            on_error: str | None = None, allowed_roots: str = "", calibrated: bool = False, shapley: bool = True,
            log=print) -> dict:
    """Writes `predictions.csv` (default `W/predict/predictions.csv`) for `manifest`'s rows; returns
    the summary also written beside it as `predictions.json`. Files are read from `allowed_roots`
    (comma-separated; default the manifest's folder); images over the run's `data.max_pixels` are bad rows."""
    import pandas as pd

    schema_path = schema or os.path.join(run.workdir, SCHEMA_FILE)
    if not os.path.exists(schema_path):
        raise DataError(f"{run.workdir} has no {SCHEMA_FILE}: predict reads new patients in the schema of a run "
                        f"trained on a manifest dataset (experiments/manifest.py or a public one); pass --schema")
    # ECGs at the rate the run was trained at (data.ecg_rate): the saved schema has the files' rate
    parsed_schema, _ = cap_ecg_rate(load_schema(schema_path, manifest, on_error),
                                    float(run.config.data.get("ecg_rate", 0) or 0))
    output = os.path.abspath(output or os.path.join(run.workdir, "predict", "predictions.csv"))
    folder = os.path.dirname(output)
    os.makedirs(folder, exist_ok=True)
    cache = tempfile.mkdtemp(prefix=".decoded-", dir=folder)
    try:
        prepared = prepare_new(manifest, parsed_schema, run.spec, cache, modalities=run.modalities,
                               roots=parse_roots(allowed_roots, manifest),
                               max_pixels=int(run.config.data.get("max_pixels", DEFAULT_MAX_PIXELS)), log=log)
        examples = [example(r, run.spec) for r in prepared.rows]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    skipped_file = os.path.join(folder, "skipped_rows.csv")
    if os.path.exists(skipped_file):  # an earlier prediction's
        os.remove(skipped_file)
    if prepared.skipped:
        write_skipped(skipped_file, prepared.skipped)
        log(f"Skipped {prepared.summary['skipped_rows']} row(s) ({len(prepared.skipped)} problem(s)); each with "
            f"its reason in {skipped_file}")
    if not examples:
        raise DataError(f"manifest {manifest}: no row left to predict")
    batches = list(run.experiment.eval_batches(None, source=examples))
    thresholds, temperatures, source = operating_points(run)
    thresholded = robustness.output_columns([t for t in run.tasks if t.kind in ("binary", "multilabel")])[1]
    undecided = [o for o in thresholded if o not in thresholds]
    if undecided:
        log(f"No .prediction column for {undecided}: no threshold could be chosen on validation (one class only "
            f"among its known labels); their probabilities are written")
    names = tuple(run.modalities)
    exact = shapley and len(names) <= robustness.MAX_SHAPLEY_MODALITIES
    if exact:
        by_subset = robustness.by_subset(run, batches, robustness.subsets(names))
        collected = by_subset[names]
        phi, columns, _ = robustness.patient_shapley(run, by_subset)
    else:
        collected = run.collect(batches)
    preds, labels, masks, ids = collected
    table = {"row": [r["index"] + 1 for r in prepared.rows], "id": [str(i) for i in ids],
             "present": [";".join(m for m in names if r["present"][m]) for r in prepared.rows]}
    scaled = {}
    for t in run.tasks:
        raw = p = preds[t.name]
        temperature = temperatures.get(t.name) if calibrated and t.kind != "regression" else None
        if temperature:
            p = calibration.scale_multiclass(raw, temperature) if t.kind == "multiclass" else \
                calibration.scale(raw, temperature)
            scaled[t.name] = temperature
        # decisions on the raw probabilities, at the raw thresholds (scaling is monotone: the same decisions)
        if t.kind == "binary":
            table[f"{t.name}.probability"] = p
            if t.name in thresholds:
                table[f"{t.name}.prediction"] = (raw >= thresholds[t.name]).astype(int)
        elif t.kind == "multilabel":
            for k, label in enumerate(t.label_names):
                table[f"{t.name}.{label}.probability"] = p[:, k]
                if f"{t.name}.{label}" in thresholds:
                    table[f"{t.name}.{label}.prediction"] = (raw[:, k] >= thresholds[f"{t.name}.{label}"]).astype(int)
        elif t.kind == "multiclass":
            for k, label in enumerate(t.label_names):
                table[f"{t.name}.{label}.probability"] = p[:, k]
            table[f"{t.name}.prediction"] = np.asarray(t.label_names)[raw.argmax(1)]
        else:
            table[f"{t.name}.value"] = p
        if exact:
            top, value = _top_modality(phi, columns, t, p, names)
            table[f"{t.name}.top_modality"], table[f"{t.name}.top_shapley"] = top, value
        if prepared.summary["labelled"].get(t.name):
            table[f"{t.name}.label"] = _label_column(t, labels[t.name], masks[t.name])
    pd.DataFrame(table).to_csv(output, index=False, float_format="%.8g")
    summary = {"manifest": os.path.abspath(manifest), "schema": os.path.abspath(schema_path), "workdir": run.workdir,
               "step": run.step, "chosen": run.chosen, "predictions": output, "operating_points_from": source,
               "thresholds": thresholds, "temperature_scaled": scaled, "shapley": bool(exact),
               **prepared.summary, "skipped_file": skipped_file if prepared.skipped else None}
    dump_json(summary, os.path.join(folder, "predictions.json"))
    return summary


def _top_modality(phi: np.ndarray, columns: list[str], task, p: np.ndarray, names: tuple) -> tuple:
    """Per row: the modality with the largest |Shapley value| on the task's output, and that value."""
    if task.kind in ("binary", "regression"):
        values = phi[:, :, columns.index(task.name)]  # [N, M]
    elif task.kind == "multiclass":
        first = columns.index(f"{task.name}.{task.label_names[0]}")
        picked = first + p.argmax(1)
        values = phi[np.arange(len(p)), :, picked]
    else:
        cols = [columns.index(f"{task.name}.{label}") for label in task.label_names]
        values = np.abs(phi[:, :, cols]).sum(-1)
    best = np.abs(values).argmax(1)
    value = values[np.arange(len(best)), best]
    return np.where(value != 0, np.asarray(names)[best], ""), value  # '': no modality moved the output


def _label_column(task, y: np.ndarray, known: np.ndarray) -> list:
    """The given labels as text ('' where unknown)."""
    if task.kind == "multilabel":
        return [";".join(n for n, v, k in zip(task.label_names, row, kr) if k and v) if kr.any() else ""
                for row, kr in zip(y, known)]
    if task.kind == "multiclass":
        return [task.label_names[int(v)] if k else "" for v, k in zip(y, known)]
    if task.kind == "binary":
        return [str(int(v)) if k else "" for v, k in zip(y, known)]
    return [repr(float(v)) if k else "" for v, k in zip(y, known)]
