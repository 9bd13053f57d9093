"""Evaluation metrics on host numpy arrays, exact (no binning), checked against scikit-learn; each
takes an optional `sample_weight` ([N], or [R, N] for R weightings at once)."""

from mmjax.metrics.classification import (
                                          accuracy,
                                          average_precision,
                                          confusion_matrix,
                                          f1_score,
                                          midranks,
                                          multiclass,
                                          nanmean,
                                          precision_recall_curve,
                                          roc_auc,
                                          roc_curve,
)
from mmjax.metrics.regression import mae, rmse

__all__ = ["accuracy", "average_precision", "confusion_matrix", "f1_score", "midranks", "multiclass", "nanmean",
           "precision_recall_curve", "roc_auc", "roc_curve", "mae", "rmse"]
