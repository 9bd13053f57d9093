"""Cross-validation as one command: `--config.data.folds=5` with no `--config.data.fold`.

    python launch.py --config=experiments/manifest.py --config.data.manifest=M --config.data.schema=S \\
        --config.data.folds=5 --workdir=W

trains every fold in `W/folds/fold<k>/` (each an ordinary run: resumable, its checkpoint chosen on its
own validation rows, so model selection stays inside the fold; a fold with `results.json` is finished
and read back), then pools the out-of-fold test predictions (every patient is in exactly one fold's
test set) and writes `W/cv/`:

- `results.json`: the pooled metrics with patient-level bootstrap intervals, each fold's test metrics
  and their mean and sd over folds (`fold_mean`: a pooled AUROC mixes the folds' models, whose scores
  need not share a scale, so on small data it can fall below every fold's own: both are shown),
  and, when the folds fitted them (`eval.baselines`), every classical baseline pooled the same way with
  the best of each fold (chosen on that fold's validation) compared with mmjax;
- `predictions.npz`: the pooled predictions (`fold` says which fold scored each row);
- `per_fold.csv`: one row per fold (rows, the headline metrics).

`python launch.py --workdir=W --mode=report` on the cross-validation's folder shows it (`build_report`). With a split
column in the manifest the test rows are the same in every fold: there is nothing to pool, and the
per-fold results are written alone.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from mmjax.console import UserError
from mmjax.evaluation import baselines as B
from mmjax.evaluation import records
from mmjax.evaluation.compare import compare_predictions
from mmjax.experiment import EVAL_DIR, RESULTS_FILE, Experiment
from mmjax.metrics import tasks as task_metrics

CV_DIR = "cv"
POOLED = "out-of-fold"


def every_fold(config) -> bool:
    """Whether `config` asks for the whole cross-validation: folds > 1 and no fold chosen (fold < 0)."""
    d = config.get("data", {})
    return int(d.get("folds", 0) or 0) > 1 and int(d.get("fold", 0)) < 0


def is_cv_root(workdir: str) -> bool:
    """Whether `workdir` is a whole cross-validation's folder (its folds inside, no run of its own)."""
    return os.path.isdir(os.path.join(workdir, "folds")) and not os.path.exists(os.path.join(workdir, "config.json"))


def fold_dir(workdir: str, k: int) -> str:
    return os.path.join(workdir, "folds", f"fold{k}")


def cross_validate(config, workdir: str, log=print) -> dict:
    """Trains (or reads back) every fold, then pools them (`pool`); returns W/cv/results.json's content."""
    import jax

    from mmjax.training.sweep import check_same_config
    from mmjax.training.train import train_and_evaluate

    folds = int(config.data.folds)
    if os.path.exists(os.path.join(workdir, "config.json")) or os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"{workdir} holds one run (config.json, checkpoints), not a cross-validation: before "
                        f"--config.data.fold=-1 ('every fold') was the default, --config.data.folds={folds} alone "
                        f"trained fold 0; resume it with --config.data.fold=0, or cross-validate in another --workdir")
    for k in range(folds):
        w = fold_dir(workdir, k)
        c = config.copy_and_resolve_references()
        c.data.fold = k
        check_same_config(c, w)  # a finished fold is read back only for the config that trained it
        if os.path.exists(os.path.join(w, RESULTS_FILE)):
            log(f"Fold {k + 1}/{folds}: finished ({os.path.join(w, RESULTS_FILE)}), read back")
            continue
        log(f"Fold {k + 1}/{folds}: training in {w}")
        out = train_and_evaluate(c, w)
        if "stopped_at_step" in out:  # train.stop_at_step: stopped on purpose; the next call resumes this fold
            return {"stopped_in_fold": k, **out}
    if jax.process_count() > 1:  # process 0 writes the last fold's files (and its baselines) after the others
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mmjax cross-validation: every fold written")
        if jax.process_index() != 0:
            return {}
    return pool(workdir, folds, log)


def _load(workdir: str, k: int, tasks):
    w = fold_dir(workdir, k)
    preds, labels, masks, ids = records.load_predictions(w, "test", tasks)
    with open(os.path.join(w, RESULTS_FILE)) as f:
        results = json.load(f)
    path = os.path.join(w, EVAL_DIR, "test_baselines.npz")
    base = None
    if os.path.exists(path):
        z = np.load(path)
        with open(os.path.join(w, EVAL_DIR, "test_baselines.json")) as f:
            written = json.load(f)
        if written.get("format") != B.FORMAT:  # by an older mmjax (another rule for the best): not pooled
            return (preds, labels, masks, ids), results, None
        best = written["best"]
        names = sorted({key[len("pred/"):].rsplit("/", 1)[0] for key in z.files if key.startswith("pred/")})
        base = {n: {t.name: z[f"pred/{n}/{t.name}"] for t in tasks} for n in names}
        base["best of each fold"] = base[best]
    return (preds, labels, masks, ids), results, base


def pool(workdir: str, folds: int, log=print) -> dict:
    """Pools the folds' test predictions (and their baselines') into `W/cv/`; see the module's doc."""
    exp = Experiment.from_workdir(fold_dir(workdir, 0))
    tasks, config = exp.tasks, exp.config
    loaded = [_load(workdir, k, tasks) for k in range(folds)]
    settings = records.eval_settings(config)
    per_fold = [{"fold": k, "rows": int(len(c[3])), "evaluated_step": r["run"]["evaluated_step"],
                 "test": r["test"]} for k, (c, r, _) in enumerate(loaded)]
    ids = np.concatenate([c[3] for c, _, _ in loaded])
    out = {"folds": folds, "per_fold": per_fold, "rows": int(len(ids)), "patients": int(len(np.unique(ids)))}
    recipes = [r["run"].get("recipe", {}).get("name", "standard") for _, r, _ in loaded]
    out["recipes"] = recipes
    if len(set(recipes)) > 1:  # config.recipe='auto' with folds on both sides of its threshold
        log(f"Warning: the folds trained with different recipes {recipes} (config.recipe=auto: their training sets "
            "are on both sides of its threshold); set --config.recipe=small or standard for one model")
    headline = B.headline(config, per_fold[0]["test"])
    values = np.array([B.metric_or_nan(f["test"], headline) for f in per_fold])
    defined = np.isfinite(values)
    out["fold_mean"] = {"metric": headline, "folds_defined": int(defined.sum()),  # folds whose test set defines it
                        "mean": float(values[defined].mean()) if defined.any() else None,
                        "sd": float(values[defined].std(ddof=1)) if defined.sum() > 1 else None}
    folder = os.path.join(workdir, CV_DIR)
    os.makedirs(folder, exist_ok=True)
    if len(np.unique(ids)) < len(ids) and len(set(map(str, loaded[0][0][3])) & set(map(str, loaded[1][0][3]))):
        out["note"] = ("the folds' test sets overlap (the manifest's split column fixes the test set): nothing "
                       "to pool; per-fold results only")
        log(f"Cross-validation: {out['note']}")
    else:
        cat = lambda i: {t.name: np.concatenate([c[i][t.name] for c, _, _ in loaded]) for t in tasks}
        preds, labels, masks = cat(0), cat(1), cat(2)
        fold_of = np.concatenate([np.full(len(c[3]), k) for k, (c, _, _) in enumerate(loaded)])
        out["pooled"] = records.with_intervals((preds, labels, masks, ids), tasks, settings)
        arrays = {f"{kind}/{k}": v for kind, d in (("pred", preds), ("label", labels), ("mask", masks))
                  for k, v in d.items()}
        np.savez_compressed(os.path.join(folder, "predictions.npz"), patient_id=ids.astype(str), fold=fold_of, **arrays)
        missing = [k for k, (_, _, b) in enumerate(loaded) if b is None]
        if missing:
            out["note"] = (f"no classical baselines: fold(s) {missing} have none (eval.baselines=False when they "
                           "trained, their fit failed, or an older mmjax wrote them)")
        else:
            try:
                out["versus"] = _versus(config, loaded, (preds, labels, masks, ids), tasks, settings)
            except Exception as e:  # noqa: BLE001  (the pooled metrics must not be lost to the baselines)
                out["note"] = f"the pooled baselines failed: {type(e).__name__}: {e}"
    records.dump_json(out, os.path.join(folder, "results.json"))
    _write_per_fold(os.path.join(folder, "per_fold.csv"), per_fold, tasks)
    log(format_cv(out, tasks))
    return out


def _versus(config, loaded, collected, tasks, settings) -> dict:
    """Every baseline's pooled predictions with intervals, and mmjax against the best of each fold."""
    preds, labels, masks, ids = collected
    names = [n for n in loaded[0][2] if all(n in b for _, _, b in loaded)]
    pooled = {n: {t.name: np.concatenate([b[n][t.name] for _, _, b in loaded]) for t in tasks} for n in names}
    metric = B.headline(config, task_metrics.compute_metrics(preds, labels, masks, tasks))
    best = "best of each fold"
    versus = {"metric": metric, "best": best, "split": POOLED, "chosen_on": "each fold's validation",
              "resamples": settings["resamples"], "model": records.with_intervals(collected, tasks, settings),
              "baselines": {n: {POOLED: records.with_intervals((p, labels, masks, ids), tasks, settings)}
                            for n, p in pooled.items()},
              "comparison": compare_predictions(preds, pooled[best], labels, masks, ids, tasks, settings["resamples"],
                                                settings["seed"], settings["level"])}
    versus["verdict"] = B.verdict(versus)
    return versus


def _write_per_fold(path: str, per_fold: list, tasks) -> None:
    keys = sorted({p for f in per_fold for p, _ in task_metrics.flat_metrics(f["test"])})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "rows", "evaluated_step", *keys])
        for r in per_fold:
            flat = dict(task_metrics.flat_metrics(r["test"]))
            w.writerow([r["fold"], r["rows"], r["evaluated_step"], *(flat.get(k, "") for k in keys)])


def format_cv(out: dict, tasks) -> str:
    metric = out.get("fold_mean", {}).get("metric", "macro_auroc")
    value = lambda tree: B.metric_or_nan(tree, metric)
    lines = [f"Cross-validation, {out['folds']} folds, {out['rows']} test rows in all ({out['patients']} patients)"]
    lines += [f"  fold {f['fold']}: {f['rows']} rows, test {metric} {value(f['test']):.4f}" for f in out["per_fold"]]
    mean = out.get("fold_mean", {})
    if mean.get("sd") is not None:
        lines.append(f"  mean over the {mean['folds_defined']} of {out['folds']} folds that define it: "
                     f"{mean['mean']:.4f} (sd {mean['sd']:.4f})")
    if "pooled" in out:
        lines.append(f"  pooled out-of-fold {metric}: {B.cell(out['pooled'], metric, 4)}")
    if "versus" in out:
        lines.append(B.format_table(out["versus"]))
        lines.append(out["versus"]["verdict"])
    if "note" in out:
        lines.append(f"  note: {out['note']}")
    return "\n".join(lines)


def build_report(workdir: str) -> str:
    """`W/report/index.html` of a whole cross-validation (`mmjax/training/cv.py`): each fold's test metrics,
    the pooled out-of-fold metrics with intervals and ROC curves, and the baselines pooled the same way."""
    import html

    from mmjax.evaluation import figures, report
    from mmjax.evaluation.format import interval_rows

    path = os.path.join(workdir, CV_DIR, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the cross-validation first (python launch.py "
                                f"--config.data.folds=K --workdir={workdir})")
    with open(path) as f:
        out = json.load(f, object_pairs_hook=lambda pairs: {k: float("nan") if v is None else v for k, v in pairs})
    tasks = Experiment.from_workdir(fold_dir(workdir, 0)).tasks
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>mmjax cross-validation: {esc(os.path.basename(os.path.abspath(workdir)))}</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%}</style></head><body>",
             f"<h1>Cross-validation: {esc(os.path.abspath(workdir))}</h1>",
             f"<pre>{esc(format_cv(out, tasks))}</pre>"]
    if "pooled" in out:
        rows = "".join(f"<tr><td>{esc(n)}</td><td>{v:.4f}</td><td>{'' if lo is None else f'[{lo:.4f}, {hi:.4f}]'}"
                       f"</td></tr>" for n, v, lo, hi in interval_rows(out["pooled"], tasks))
        parts.append("<h2>Pooled out-of-fold metrics</h2><table><tr><th>metric</th><th>value</th><th>interval</th>"
                     f"</tr>{rows}</table>")
        z = np.load(os.path.join(workdir, CV_DIR, "predictions.npz"))
        get = lambda kind: {t.name: z[f"{kind}/{t.name}"] for t in tasks}
        roc = figures.roc_figure(get("pred"), get("label"), get("mask"), tasks)
        if roc is not None:
            parts.append("<h2>ROC curves (pooled out-of-fold)</h2>" + report.figure_html("roc", figures.png(roc)))
    if "versus" in out:
        parts.append(report.baselines_section(out["versus"]))
    parts.append("</body></html>")
    folder = os.path.join(workdir, "report")
    os.makedirs(folder, exist_ok=True)
    page = os.path.join(folder, "index.html")
    with open(page, "w") as f:
        f.write("\n".join(parts))
    return page
