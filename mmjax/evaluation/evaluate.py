"""`--mode=evaluate`: a trained workdir's metrics with patient-level bootstrap intervals,
calibration and operating points, robustness to missing and noisy modalities with Shapley values
over modalities, and integrated-gradient explanations of a few patients.

    python launch.py --workdir=W --mode=evaluate [--split=test] [--step=N] [--explain=4]

The run is rebuilt from `W/config.json` and `W/dataset_spec.json` (vocabularies, statistics, tasks:
saved at training time), with the best checkpoint by validation `best_metric` (or `--step`); the
rows come from the split of the dataset that `config.data` names. What is written to `W/eval/`:
`<split>.json` and `<split>_predictions.npz` (`records.py`), `<split>_baselines.json` and `.npz` (the
classical baselines beside the model: `baselines.py`), `<split>_robustness.json` and
`<split>_shapley.npz` (`robustness.py`), `<split>_subgroups.json` (every metric per sex, age band, site,
`--groups=` column and subset of present modalities, with the gap's permutation test: `subgroups.py`),
`<split>_attributions.npz` (`attribution.py`).

`evaluate` is the one sequence of these; the launcher calls it, and so does the report (with
`reuse=True`: files of the same checkpoint step are read back instead of computed again).
"""

from __future__ import annotations

import os

import numpy as np

from mmjax.evaluation import attribution, baselines, records, robustness, subgroups
from mmjax.experiment import EVAL_DIR

# Arrays of an attributions file with one row per patient (the rest are per-file).
_PER_PATIENT = ("patient_id", "f_input", "f_baseline", "completeness_gap", "attention")


def evaluate_split(predictor, split: str = "test") -> dict:
    """Writes `eval/<split>.json` and `eval/<split>_predictions.npz`; temperatures and thresholds are
    fitted on validation when the split is another one."""
    collected = predictor.collect(predictor.batches(split))
    reference = None
    if split != "validation" and "validation" in predictor.experiment.splits:
        reference = predictor.collect(predictor.batches("validation"))
    return records.write(predictor.workdir, split, collected, predictor.tasks, predictor.step, predictor.config,
                         reference)


def evaluate(predictor, split: str = "test", *, analyze: bool = True, explain: int = 4, output: str = "",
             patients=(), reuse: bool = False, with_baselines: bool = True, groups=()) -> dict:
    """{'record', 'baselines', 'subgroups', 'robustness', 'explanation', 'written'} of `split` (subgroups per
    `config.eval` and the extra manifest columns `groups`; baselines None with
    `with_baselines=False` (`--baselines=false`), the run's `eval.baselines=False`, on the training split
    or when they fail (a warning), robustness and explanation None when not asked:
    `analyze=False`, `explain=0` with no `patients`)."""
    step = predictor.step
    rec = (reuse and records.load_eval(predictor.workdir, f"{split}.json", step)) or evaluate_split(predictor, split)
    written = [f"{split}.json", f"{split}_predictions.npz"]
    versus = None
    if with_baselines and baselines.enabled(predictor.config) and split != "train":
        versus = reuse and records.load_eval(predictor.workdir, f"{split}_baselines.json", step)
        if not versus or versus.get("format") != baselines.FORMAT:
            versus = baselines.compare_or_warn(predictor.experiment, split, step,
                                               records.load_predictions(predictor.workdir, split, predictor.tasks), rec)
        if versus is not None:
            written += [f"{split}_baselines.json", f"{split}_baselines.npz"]
    groups = tuple(groups)
    by_group = reuse and records.load_eval(predictor.workdir, f"{split}_subgroups.json", step)
    wanted = subgroups.resolved(subgroups.settings(predictor.config, groups))
    if not by_group or by_group.get("format") != subgroups.FORMAT or by_group.get("options") != wanted:
        by_group = subgroups.evaluate(predictor.experiment, split, step,
                                      records.load_predictions(predictor.workdir, split, predictor.tasks), groups)
    written.append(f"{split}_subgroups.json")
    rob = None
    if analyze:
        rob = (reuse and records.load_eval(predictor.workdir, f"{split}_robustness.json", step)) or \
            robustness.analyze(predictor, split)
        written += [f"{split}_robustness.json"] + ([f"{split}_shapley.npz"] if "shapley" in rob else [])
    ex = None
    patients = tuple(str(p) for p in patients)
    if explain > 0 or patients:
        ex = (reuse and _stored_explanation(predictor, split, explain, output, patients)) or \
            attribution.explain(predictor, split, explain, output, patients=patients)
        written.append(f"{split}_attributions.npz")
    return {"record": rec, "baselines": versus, "subgroups": by_group, "robustness": rob, "explanation": ex,
            "written": written}


def _stored_explanation(predictor, split: str, count: int, output: str, patients: tuple) -> dict | None:
    """The attributions of `W/eval/<split>_attributions.npz` if they are of this checkpoint and cover
    what is asked (`count` patients, or the ids `patients`), cut to it; else None."""
    path = os.path.join(predictor.workdir, EVAL_DIR, f"{split}_attributions.npz")
    if not os.path.exists(path):
        return None
    z = dict(np.load(path))
    ids = [str(i) for i in z["patient_id"]]
    covers = set(patients) <= set(ids) if patients else len(ids) >= count
    if int(z.get("step", -1)) != predictor.step or not covers or (output and str(z["output"]) != output):
        return None
    keep = np.array([i in set(patients) for i in ids]) if patients else np.arange(len(ids)) < count
    per_patient = lambda k: k in _PER_PATIENT or k.split("/")[0] in ("attribution", "present", "input", "tokens")
    return {k: v[keep] if per_patient(k) else v for k, v in z.items()}
