"""Metrics against scikit-learn on random data, ties and edge cases included."""

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics as skm

from mmjax import metrics
from mmjax.evaluation.upper_bound import fit_logistic


@pytest.mark.parametrize("seed", range(20))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    score = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 3)))  # with ties
    pred = (score > 0.5).astype(int)
    assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert metrics.average_precision(y, score) == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)
    assert metrics.f1_score(y, pred) == pytest.approx(skm.f1_score(y, pred, zero_division=0.0), abs=1e-12)
    assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=100), rng.normal(size=100)
    assert metrics.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p), abs=1e-12)
    assert metrics.rmse(y, p) == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)), abs=1e-12)


def test_undefined_metrics_are_nan_and_bad_input_raises():
    assert np.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))
    assert metrics.f1_score([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="finite"):
        metrics.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


def test_upper_bound_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = (x @ rng.normal(size=5) + rng.normal(size=400) > 0).astype(float)
    w = fit_logistic(np.c_[np.ones(400), x], y, l2=1.0)
    ref = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(w[1:], ref.coef_[0], atol=1e-4)
    np.testing.assert_allclose(w[0], ref.intercept_[0], atol=1e-4)
