"""Regression metrics; `sample_weight` as in `mmjax.metrics.classification` ([N] or [R, N])."""

from __future__ import annotations

import numpy as np

from mmjax.metrics.classification import _divide, _out, _weights


def _weighted_mean(values: np.ndarray, sample_weight):
    w = _weights(sample_weight, len(values))
    return _divide(w @ values, w.sum(1))


def mae(y_true, y_pred, sample_weight=None):
    d = np.asarray(y_pred, np.float64).ravel() - np.asarray(y_true, np.float64).ravel()
    return _out(_weighted_mean(np.abs(d), sample_weight), sample_weight)


def rmse(y_true, y_pred, sample_weight=None):
    d = np.asarray(y_pred, np.float64).ravel() - np.asarray(y_true, np.float64).ravel()
    return _out(np.sqrt(_weighted_mean(d**2, sample_weight)), sample_weight)
