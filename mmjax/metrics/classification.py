"""Binary and multiclass classification metrics. Each returns NaN when it is undefined (e.g. one
class only).

Every metric takes an optional `sample_weight`, as scikit-learn's: [N] weights give a float,
[R, N] weights (R weightings of the same rows at once, e.g. a bootstrap's resample counts) give
an array [R]; without it every row weighs 1. Rows of weight 0 are absent (ties and thresholds
included), so a resample's counts give exactly the metric of the resampled rows.
"""

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


def midranks(x) -> np.ndarray:
    """Ranks 1..n with ties given the mean of their ranks."""
    x = np.asarray(x)
    order, starts = _tie_groups(x)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _weights(sample_weight, n: int) -> np.ndarray:
    """[R, n] float64 weights (R = 1 without weights or with [n] weights)."""
    w = np.ones((1, n)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w[None] if w.ndim == 1 else w
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"sample_weight {np.shape(sample_weight)} does not match {n} rows")
    return w


def _out(values: np.ndarray, sample_weight):
    """A float for unweighted or [N]-weighted calls, the [R] array for [R, N] weights."""
    if sample_weight is not None and np.ndim(sample_weight) == 2:
        return values
    return float(values[0])


def _divide(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _tie_groups(scores: np.ndarray, descending: bool = False):
    """Order sorting `scores` and the start of each run of equal scores in that order."""
    order = np.argsort(-scores if descending else scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    return order, starts


def _group_sums(w: np.ndarray, order, starts) -> np.ndarray:
    """[R, G]: the weights of each tie group."""
    if not len(starts):
        return np.zeros((w.shape[0], 0))
    return np.add.reduceat(w[:, order], starts, axis=1)


def roc_auc(y_true, y_score, sample_weight=None):
    """Area under the ROC curve: the (weighted) Mann-Whitney U with ties counted 1/2."""
    y, s = _check(y_true, y_score)
    w = _weights(sample_weight, len(y))
    order, starts = _tie_groups(s)
    pos, neg = _group_sums(w * y, order, starts), _group_sums(w * (1 - y), order, starts)
    below = np.cumsum(neg, axis=1) - neg  # negative weight with a strictly lower score
    u = np.sum(pos * (below + 0.5 * neg), axis=1)
    return _out(_divide(u, pos.sum(1) * neg.sum(1)), sample_weight)


def average_precision(y_true, y_score, sample_weight=None):
    """Area under the precision-recall curve as a step function (scikit-learn's definition)."""
    y, s = _check(y_true, y_score)
    w = _weights(sample_weight, len(y))
    order, starts = _tie_groups(s, descending=True)  # thresholds: one per distinct score
    tp = np.cumsum(_group_sums(w * y, order, starts), axis=1)
    predicted = np.cumsum(_group_sums(w, order, starts), axis=1)
    precision = np.nan_to_num(_divide(tp, predicted))  # a group of weight 0 adds no recall either
    recall = _divide(tp, tp[:, -1:]) if tp.shape[1] else tp
    ap = np.sum(np.diff(np.concatenate([np.zeros((len(w), 1)), recall], 1), axis=1) * precision, axis=1)
    return _out(np.where(tp[:, -1] > 0, ap, np.nan) if tp.shape[1] else np.full(len(w), np.nan), sample_weight)


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds): one point per distinct score, from
    (0, 0) at threshold +inf; a point is 'predict positive when score >= threshold'."""
    tp, fp, thresholds = _cumulative_counts(y_true, y_score)
    return _divide(fp, fp[-1]), _divide(tp, tp[-1]), thresholds


def precision_recall_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) in decreasing threshold order, one point per distinct score
    (precision of the highest-scored group first)."""
    tp, fp, thresholds = _cumulative_counts(y_true, y_score)
    return _divide(tp, tp + fp)[1:], _divide(tp, tp[-1])[1:], thresholds[1:]


def _cumulative_counts(y_true, y_score):
    """True and false positives at each distinct score in decreasing order, from 0 at +inf."""
    y, s = _check(y_true, y_score)
    order, starts = _tie_groups(s, descending=True)
    w = np.ones((1, len(y)))
    tp = np.r_[0.0, np.cumsum(_group_sums(w * y, order, starts)[0])]
    fp = np.r_[0.0, np.cumsum(_group_sums(w * (1 - y), order, starts)[0])]
    return tp, fp, np.r_[np.inf, s[order][starts]]


def f1_score(y_true, y_pred, sample_weight=None):
    """F1 of hard 0/1 predictions; 0 when there are no positives and no predicted positives."""
    y, p = _check(y_true, y_pred)
    w = _weights(sample_weight, len(y))
    tp = w @ (y * p)
    denom = 2 * tp + w @ ((1 - y) * p) + w @ (y * (1 - p))
    return _out(np.nan_to_num(_divide(2 * tp, denom)), sample_weight)


def accuracy(y_true, y_pred, sample_weight=None):
    y, p = _check(y_true, y_pred)
    w = _weights(sample_weight, len(y))
    return _out(_divide(w @ (y == p), w.sum(1)), sample_weight)


def confusion_matrix(y_true, y_pred, num_classes: int, sample_weight=None) -> np.ndarray:
    """counts[i, j]: examples of true class i predicted as j (summed weights with `sample_weight`;
    [R, K, K] for [R, N] weights)."""
    y_true, y_pred = np.asarray(y_true, np.int64).ravel(), np.asarray(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    for name, v in (("labels", y_true), ("predictions", y_pred)):
        if len(v) and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must be class indices in [0, {num_classes})")
    cells = num_classes**2
    if sample_weight is None:
        return np.bincount(y_true * num_classes + y_pred, minlength=cells).reshape(num_classes, num_classes)
    w = _weights(sample_weight, len(y_true))
    cell = np.arange(len(w))[:, None] * cells + (y_true * num_classes + y_pred)[None]  # [R, N]: one bincount
    cm = np.bincount(cell.ravel(), weights=w.ravel(), minlength=len(w) * cells).reshape(-1, num_classes, num_classes)
    return cm if np.ndim(sample_weight) == 2 else cm[0]


def multiclass(y_true, proba, sample_weight=None) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present), macro-F1 (over the classes in
    labels or predictions, scikit-learn's default), one-vs-rest macro-AUROC (over the classes with both
    positives and negatives) and the confusion matrix, from class indices [N] and probabilities [N, K].
    With [R, N] weights every value is an array [R] (the confusion matrix [R, K, K])."""
    proba = np.asarray(proba, np.float64)
    y = np.asarray(y_true, np.int64).ravel()
    n, k = proba.shape
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} predictions")
    if not np.all(np.isfinite(proba)):
        raise ValueError("scores must be finite")
    w = _weights(sample_weight, n)
    pred = np.argmax(proba, axis=1)
    cm = confusion_matrix(y, pred, k, None if sample_weight is None else w)
    cm = cm[None] if cm.ndim == 2 else cm  # [R, K, K]
    support, predicted, tp = cm.sum(2), cm.sum(1), np.diagonal(cm, axis1=1, axis2=2)
    aurocs = np.stack([roc_auc(y == c, proba[:, c], w) for c in range(k)], 1)  # NaN: one class only
    out = {"accuracy": _divide(tp.sum(1), support.sum(1)),
           "balanced_accuracy": nanmean(np.where(support > 0, _divide(tp, support), np.nan)),
           "macro_f1": nanmean(np.where(support + predicted > 0, _divide(2 * tp, support + predicted), np.nan)),
           "macro_auroc": nanmean(aurocs)}
    if sample_weight is not None and np.ndim(sample_weight) == 2:
        return {**out, "confusion_matrix": cm}
    return {**{key: float(v[0]) for key, v in out.items()}, "confusion_matrix": cm[0].tolist(), "count": int(n)}


def nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over `axis` ignoring NaN; NaN (without numpy's warning) where every value is NaN."""
    x = np.asarray(x, np.float64)
    finite = ~np.isnan(x)
    return _divide(np.where(finite, x, 0.0).sum(axis), finite.sum(axis))
