"""Evaluation over one pass of a split: per task and label AUROC, AUPRC, F1, accuracy (binary,
multilabel), accuracy, balanced accuracy, macro-F1, one-vs-rest macro-AUROC and the confusion
matrix (multiclass), MAE and RMSE (regression), with macro averages.

`macro_auroc` at the top level is the mean AUROC over every classification output: each label of
a multilabel task, each binary task, and each multiclass task's one-vs-rest macro-AUROC. Only rows
with `example_mask` and a known label count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from mmjax import metrics
from mmjax.batch import TaskSpec


def collect(predict: Callable, batches: Iterable[dict], tasks: Sequence[TaskSpec], with_ids: bool = False,
            keep_padding: bool = False):
    """Runs `predict(batch) -> {task: [B, ...]}` over batches; returns (predictions, labels, masks)
    concatenated over real rows only, and the rows' patient ids as a fourth item with `with_ids`.
    `keep_padding`: every row, padding too, and the example mask `[N]` as a fifth item (what is
    gathered across processes before the padding is dropped)."""
    preds, labels, masks = ({t.name: [] for t in tasks} for _ in range(3))
    ids, real = [], []
    for batch in batches:
        out = predict(batch)
        rows = np.asarray(batch["example_mask"], bool)
        real.append(rows)
        take = slice(None) if keep_padding else rows
        ids.append(np.asarray(batch["patient_id"])[take] if with_ids else np.zeros(0))
        for t in tasks:
            preds[t.name].append(np.asarray(out[t.name], np.float64)[take])  # [N] or [N, K]
            labels[t.name].append(np.asarray(batch["labels"][t.name], np.float64)[take])
            masks[t.name].append(np.asarray(batch["label_mask"][t.name], bool)[take])
    cat = lambda d: {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in d.items()}
    out = (cat(preds), cat(labels), cat(masks))
    if with_ids:
        out += (np.concatenate(ids) if ids else np.zeros(0, str),)
    if keep_padding:
        out += (np.concatenate(real) if real else np.zeros(0, bool),)
    return out


def flat_metrics(tree, prefix: str = ""):
    """(dotted path, value) of every float metric of a `compute_metrics` tree (counts, class lists and
    confusion matrices left out); with [R]-weighted trees, the [R] arrays."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat_metrics(v, f"{prefix}{k}.")
    elif isinstance(tree, (float, np.floating)) or (isinstance(tree, np.ndarray) and tree.ndim == 1):
        yield prefix[:-1], tree


def id_codes(ids) -> np.ndarray:
    """Stable signed 64-bit codes of string ids (the same on every process and run)."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
                     for i in np.asarray(ids).ravel()], np.int64)


def _binary(y, p, known, w) -> dict:
    y, p, w = y[known], p[known], None if w is None else w[..., known]
    hard = (p >= 0.5).astype(np.float64)
    return {"auroc": metrics.roc_auc(y, p, w), "auprc": metrics.average_precision(y, p, w),
            "f1": metrics.f1_score(y, hard, w), "accuracy": metrics.accuracy(y, hard, w),
            "positives": int(y.sum()), "count": int(len(y))}


def _mean(values: list, defined: list | None = None):
    """Mean of the metrics of several outputs: of floats, ignoring NaN; of [R] arrays (resamples), over
    the outputs `defined` on the full data, a resample where one of them is undefined (e.g. no positive
    drawn) giving NaN, so every resample averages the same outputs as the point estimate."""
    if not values:
        return float("nan")
    stacked = np.stack([np.asarray(v, np.float64) for v in values], -1)
    if stacked.ndim == 1:
        return float(metrics.nanmean(stacked))
    keep = np.asarray(defined if defined is not None else [True] * len(values), bool)
    return stacked[:, keep].mean(-1) if keep.any() else np.full(len(stacked), np.nan)


def compute_metrics(preds: dict, labels: dict, masks: dict, tasks: Sequence[TaskSpec], sample_weight=None) -> dict:
    """Every task's metrics; with `sample_weight` [R, N] (R weightings of the rows, e.g. bootstrap counts)
    every metric is an array [R] (counts stay the unweighted integers)."""
    results, aurocs, defined = {}, [], []
    w = sample_weight
    for t in tasks:
        p, y, known = preds[t.name], labels[t.name], masks[t.name]
        if t.kind == "regression":
            wk = None if w is None else w[..., known]
            results[t.name] = {"mae": metrics.mae(y[known], p[known], wk), "rmse": metrics.rmse(y[known], p[known], wk),
                               "count": int(known.sum())}
        elif t.kind == "binary":
            results[t.name] = _binary(y, p, known, w)
            aurocs.append(results[t.name]["auroc"])
            defined.append(_two_classes(results[t.name]))
        elif t.kind == "multiclass":
            results[t.name] = {**metrics.multiclass(y[known], p[known], None if w is None else w[..., known]),
                               "classes": list(t.label_names)}
            aurocs.append(results[t.name]["macro_auroc"])
            defined.append(len(np.unique(y[known])) > 1)
        else:
            per = {name: _binary(y[:, k], p[:, k], known[:, k], w) for k, name in enumerate(t.label_names)}
            ok = [_two_classes(r) for r in per.values()]
            macro = {m: _mean([r[m] for r in per.values()], ok) for m in ("auroc", "auprc", "f1", "accuracy")}
            results[t.name] = {"labels": per, **{f"macro_{m}": v for m, v in macro.items()}}
            aurocs += [r["auroc"] for r in per.values()]
            defined += ok
    results["macro_auroc"] = _mean(aurocs, defined)
    return results


def _two_classes(r: dict) -> bool:
    """Whether a binary output's known labels hold both classes (its AUROC is defined)."""
    return 0 < r["positives"] < r["count"]


def format_table(results: dict, tasks: Sequence[TaskSpec]) -> str:
    """A fixed-width table of `{split: metrics}`, each metric named by its path in the results."""
    splits = list(results)
    rows = [("metric", *splits)]
    rows.append(("macro_auroc (all binary outputs)", *(f"{results[s]['macro_auroc']:.4f}" for s in splits)))
    for t in tasks:
        if t.kind == "multilabel":
            for m in ("macro_auroc", "macro_auprc", "macro_f1"):
                rows.append((f"{t.name}.{m}", *(f"{results[s][t.name][m]:.4f}" for s in splits)))
            for name in t.label_names:
                cells = (f"{results[s][t.name]['labels'][name]['auroc']:.4f}" for s in splits)
                rows.append((f"{t.name}.labels.{name}.auroc", *cells))
        elif t.kind == "binary":
            for m in ("auroc", "auprc", "f1", "accuracy"):
                rows.append((f"{t.name}.{m}", *(f"{results[s][t.name][m]:.4f}" for s in splits)))
        elif t.kind == "multiclass":
            for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
                rows.append((f"{t.name}.{m}", *(f"{results[s][t.name][m]:.4f}" for s in splits)))
        else:
            for m in ("mae", "rmse"):
                rows.append((f"{t.name}.{m}", *(f"{results[s][t.name][m]:.4f}" for s in splits)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>10}" for c in r[1:]) for r in rows)
