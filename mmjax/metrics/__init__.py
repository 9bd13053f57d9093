"""Evaluation metrics on host numpy arrays, exact (no binning), checked against scikit-learn."""

from mmjax.metrics.classification import accuracy, average_precision, confusion_matrix, f1_score, multiclass, roc_auc
from mmjax.metrics.regression import mae, rmse

__all__ = ["accuracy", "average_precision", "confusion_matrix", "f1_score", "multiclass", "roc_auc", "mae", "rmse"]
