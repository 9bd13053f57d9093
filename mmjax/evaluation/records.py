"""The evaluation files of a workdir: `W/eval/<split>.json` (metrics, patient-level bootstrap
intervals, calibration, operating points) and `W/eval/<split>_predictions.npz` (the predictions
behind them, what `python -m mmjax.evaluation.compare` pairs).

`config.eval`: `bootstrap_resamples` (default 1000; 0: no intervals), `bootstrap_seed`, `level`
(0.95), `calibration_bins` (10), `operating_point` ('youden' or 'sensitivity', with
`target_sensitivity`): see `mmjax/metrics/calibration.py`. When the split is not validation,
temperatures and thresholds are fitted on validation and applied to it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mmjax.experiment import EVAL_DIR
from mmjax.metrics import bootstrap, calibration
from mmjax.metrics import tasks as task_metrics


def eval_settings(config) -> dict:
    e = config.get("eval", None) or {}
    return {"resamples": int(e.get("bootstrap_resamples", bootstrap.DEFAULT_RESAMPLES)),
            "seed": int(e.get("bootstrap_seed", 0)), "level": float(e.get("level", 0.95)),
            "bins": int(e.get("calibration_bins", 10)), "rule": str(e.get("operating_point", "youden")),
            "target_sensitivity": float(e.get("target_sensitivity", 0.9))}


def record(collected, tasks, step: int, reference=None, resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = 0,
           level: float = 0.95, bins: int = 10, rule: str = "youden", target_sensitivity: float = 0.9) -> dict:
    """{'step', 'metrics', 'ci', 'bootstrap', 'calibration', 'operating_points', ...}: point metrics, their
    percentile intervals from `resamples` patient-level resamples (the rows' patient ids are the
    resampling unit), calibration and operating points with temperatures and thresholds fitted on
    `reference` (the validation split's collected predictions; None: on these rows)."""
    preds, labels, masks, ids = collected
    point = task_metrics.compute_metrics(preds, labels, masks, tasks)
    out = {"step": int(step), "metrics": point,
           **calibration.summary(collected, tasks, reference, bins, rule, target_sensitivity)}
    if resamples > 0 and len(ids):
        boot = bootstrap.resample(lambda w: task_metrics.compute_metrics(preds, labels, masks, tasks, sample_weight=w),
                                  ids, resamples, seed)
        out["ci"] = bootstrap.intervals(boot, level)
        out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": level, "unit": "patient",
                            "patients": int(len(np.unique(ids))), "rows": int(len(ids)),
                            "method": "percentile"}
    return out


def with_intervals(collected, tasks, settings: dict) -> dict:
    """{'metrics', 'ci'}: point metrics of `collected` (preds, labels, masks, patient ids) and their
    percentile intervals from `settings['resamples']` patient-level resamples (`eval_settings`: the same
    resamples as `record`'s for the same ids and seed)."""
    preds, labels, masks, ids = collected
    out = {"metrics": task_metrics.compute_metrics(preds, labels, masks, tasks)}
    if settings["resamples"] > 0 and len(ids):
        boot = bootstrap.resample(lambda w: task_metrics.compute_metrics(preds, labels, masks, tasks, sample_weight=w),
                                  ids, settings["resamples"], settings["seed"])
        out["ci"] = bootstrap.intervals(boot, settings["level"])
    return out


def write(workdir: str, split: str, collected, tasks, step: int, config, reference=None) -> dict:
    """Writes `eval/<split>.json` (metrics, intervals, calibration, operating points; temperatures and
    thresholds fitted on `reference`, the validation split's predictions) and `eval/<split>_predictions.npz`."""
    rec = record(collected, tasks, step, reference, **eval_settings(config))
    rec["split"] = split
    folder = os.path.join(workdir, EVAL_DIR)
    os.makedirs(folder, exist_ok=True)
    dump_json(rec, os.path.join(folder, f"{split}.json"))
    preds, labels, masks, ids = collected
    np.savez_compressed(os.path.join(folder, f"{split}_predictions.npz"), patient_id=np.asarray(ids, str),
                        **{f"pred/{k}": v for k, v in preds.items()}, **{f"label/{k}": v for k, v in labels.items()},
                        **{f"mask/{k}": v for k, v in masks.items()})
    return rec


def load_predictions(workdir: str, split: str, tasks) -> tuple:
    """(preds, labels, masks, ids) as `write` saved them."""
    path = os.path.join(workdir, EVAL_DIR, f"{split}_predictions.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python launch.py --workdir={workdir} --mode=evaluate "
                                f"--split={split}` first")
    z = np.load(path)
    get = lambda kind: {t.name: z[f"{kind}/{t.name}"] for t in tasks}
    return get("pred"), get("label"), get("mask"), z["patient_id"]


def load_eval(workdir: str, name: str, step: int) -> dict | None:
    """`W/eval/<name>` (a JSON file `write` or `analyze` wrote) if it exists and is of checkpoint
    `step`, else None; null values (NaN when written) read back as NaN."""
    path = os.path.join(workdir, EVAL_DIR, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f, object_pairs_hook=lambda pairs: {k: float("nan") if v is None else v for k, v in pairs})
    return rec if rec.get("step") == step else None


def plain(x):
    """JSON-ready: arrays as lists, NaN and infinities as null (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def dump_json(obj, path: str) -> None:
    """Strict JSON of `obj` (`plain`) at `path`, written whole or not at all (a reader never sees half a file)."""
    with open(path + ".partial", "w") as f:
        json.dump(plain(obj), f, indent=2, allow_nan=False)
    os.replace(path + ".partial", path)
