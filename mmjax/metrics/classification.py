"""Binary classification metrics. Each returns NaN when it is undefined (e.g. one class only)."""

from __future__ import annotations

import numpy as np


def _check(y_true, y_score):
    y_true = np.asarray(y_true, np.float64).ravel()
    y_score = np.asarray(y_score, np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} differ in shape")
    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(y_score)):
        raise ValueError("scores must be finite")
    return y_true, y_score


def _midranks(x):
    """Ranks 1..n with ties given the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction)."""
    y, s = _check(y_true, y_score)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true, y_score) -> float:
    """Area under the precision-recall curve as a step function (scikit-learn's definition)."""
    y, s = _check(y_true, y_score)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # thresholds: one per distinct score
    tp = np.cumsum(y)[last_of_tie]
    predicted = (np.arange(1, len(y) + 1))[last_of_tie]
    precision = tp / predicted
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_score(y_true, y_pred) -> float:
    """F1 of hard 0/1 predictions; 0 when there are no positives and no predicted positives."""
    y, p = _check(y_true, y_pred)
    tp = np.sum((y == 1) & (p == 1))
    denom = 2 * tp + np.sum((y == 0) & (p == 1)) + np.sum((y == 1) & (p == 0))
    return float(2 * tp / denom) if denom else 0.0


def accuracy(y_true, y_pred) -> float:
    y, p = _check(y_true, y_pred)
    return float(np.mean(y == p)) if len(y) else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """counts[i, j]: examples of true class i predicted as j."""
    y_true, y_pred = np.asarray(y_true, np.int64).ravel(), np.asarray(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    for name, v in (("labels", y_true), ("predictions", y_pred)):
        if len(v) and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must be class indices in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def multiclass(y_true, proba) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present), macro-F1 (over the classes in
    labels or predictions, scikit-learn's default), one-vs-rest macro-AUROC (over the classes with both
    positives and negatives) and the confusion matrix, from class indices [N] and probabilities [N, K]."""
    proba = np.asarray(proba, np.float64)
    y = np.asarray(y_true, np.int64).ravel()
    n, k = proba.shape
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} predictions")
    if not np.all(np.isfinite(proba)):
        raise ValueError("scores must be finite")
    pred = np.argmax(proba, axis=1)
    cm = confusion_matrix(y, pred, k)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / support
        f1 = 2 * tp / (support + predicted)
    aurocs = [roc_auc(y == c, proba[:, c]) for c in range(k) if 0 < support[c] < n]
    return {"accuracy": float(tp.sum() / n) if n else float("nan"),
            "balanced_accuracy": float(np.mean(recall[support > 0])) if n else float("nan"),
            "macro_f1": float(np.mean(f1[(support + predicted) > 0])) if n else float("nan"),
            "macro_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
            "confusion_matrix": cm.tolist(), "count": int(n)}
