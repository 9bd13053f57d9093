"""Regression metrics."""

from __future__ import annotations

import numpy as np


def mae(y_true, y_pred) -> float:
    d = np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)
    return float(np.mean(np.abs(d))) if d.size else float("nan")


def rmse(y_true, y_pred) -> float:
    d = np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)
    return float(np.sqrt(np.mean(d**2))) if d.size else float("nan")
