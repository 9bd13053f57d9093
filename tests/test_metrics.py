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


def _multiclass_data(seed, k=4):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.uniform(0, 1)
    logits = np.round(logits, int(rng.integers(0, 3)))  # ties too
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def _check_against_sklearn(y, proba, got):
    pred = proba.argmax(1)
    k = proba.shape[1]
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    np.testing.assert_array_equal(got["confusion_matrix"], skm.confusion_matrix(y, pred, labels=np.arange(k)))
    assert got["count"] == len(y)


@pytest.mark.parametrize("seed", range(10))
def test_multiclass_metrics_match_sklearn(seed):
    y, proba = _multiclass_data(seed)
    got = metrics.multiclass(y, proba)
    _check_against_sklearn(y, proba, got)
    assert got["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"),
                                               abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # scikit-learn's balanced accuracy
@pytest.mark.parametrize("seed", range(3))
def test_multiclass_metrics_with_a_class_absent_from_the_labels(seed):
    y, proba = _multiclass_data(seed)
    keep = y != 2
    y, proba = y[keep], proba[keep]
    proba[:3] = [0.1, 0.1, 0.7, 0.1]  # class 2 is still predicted: its F1 of 0 counts, as in scikit-learn
    got = metrics.multiclass(y, proba)
    _check_against_sklearn(y, proba, got)
    ovr = [skm.roc_auc_score(y == c, proba[:, c]) for c in (0, 1, 3)]  # class 2 has no positive: no AUROC
    assert got["macro_auroc"] == pytest.approx(np.mean(ovr), abs=1e-12)
    assert np.asarray(got["confusion_matrix"])[2].sum() == 0


def test_multiclass_evaluation_and_bad_input():
    from mmjax.batch import TaskSpec
    from mmjax.metrics.tasks import compute_metrics

    y, proba = _multiclass_data(0)
    known = np.arange(len(y)) % 5 != 0
    task = TaskSpec("view", "multiclass", ("a", "b", "c", "d"))
    res = compute_metrics({"view": proba}, {"view": y.astype(np.float64)}, {"view": known}, [task])
    expect = metrics.multiclass(y[known], proba[known])
    assert res["view"] == {**expect, "classes": ["a", "b", "c", "d"]}  # only rows with a known label count
    assert res["macro_auroc"] == expect["macro_auroc"]
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 2, 2, 1], [0, 2, 1, 1], 3),
                                  [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match="class indices in"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="finite"):
        metrics.multiclass([0, 1], [[0.5, np.nan], [0.5, 0.5]])
    with pytest.raises(ValueError, match="3 labels for 2 predictions"):
        metrics.multiclass([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]])


@pytest.mark.parametrize("seed", range(6))
def test_count_weights_equal_the_metrics_of_the_repeated_rows(seed):
    """A bootstrap resample as counts: [R, N] weights give, row by row, each metric of the rows
    repeated that many times (rows of count 0 absent, ties and all), and agree with scikit-learn's
    sample_weight."""
    rng = np.random.default_rng(seed)
    n, k = 60, 3
    y = rng.integers(0, 2, n)
    score = np.round(rng.normal(size=n) + y, 1)  # ties
    pred = (score > 0.5).astype(int)
    cls = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    counts = rng.multinomial(n, np.ones(n) / n, size=5).astype(float)  # [R, N]
    batched = {
        "roc_auc": metrics.roc_auc(y, score, counts), "average_precision": metrics.average_precision(y, score, counts),
        "f1": metrics.f1_score(y, pred, counts), "accuracy": metrics.accuracy(y, pred, counts),
        "mae": metrics.mae(score, y, counts), "rmse": metrics.rmse(score, y, counts),
        **{f"mc_{m}": v for m, v in metrics.multiclass(cls, proba, counts).items()}}
    for r, c in enumerate(counts):
        i = np.repeat(np.arange(n), c.astype(int))
        expect = {
            "roc_auc": metrics.roc_auc(y[i], score[i]), "average_precision": metrics.average_precision(y[i], score[i]),
            "f1": metrics.f1_score(y[i], pred[i]), "accuracy": metrics.accuracy(y[i], pred[i]),
            "mae": metrics.mae(score[i], y[i]), "rmse": metrics.rmse(score[i], y[i]),
            **{f"mc_{m}": v for m, v in metrics.multiclass(cls[i], proba[i]).items() if m != "count"}}
        for name, value in expect.items():
            np.testing.assert_allclose(batched[name][r], value, atol=1e-12, err_msg=name)
        sk = {"roc_auc": skm.roc_auc_score(y, score, sample_weight=c),
              "average_precision": skm.average_precision_score(y, score, sample_weight=c),
              "f1": skm.f1_score(y, pred, sample_weight=c), "mc_accuracy": skm.accuracy_score(cls, proba.argmax(1),
                                                                                              sample_weight=c),
              "mc_balanced_accuracy": skm.balanced_accuracy_score(cls, proba.argmax(1), sample_weight=c)}
        for name, value in sk.items():
            assert batched[name][r] == pytest.approx(value, abs=1e-12), name
        assert metrics.roc_auc(y, score, c) == pytest.approx(batched["roc_auc"][r], abs=1e-12)  # [N] weights: a float


def test_roc_and_pr_curves_match_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # ties
    fpr, tpr, th = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_th = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(th[1:], sk_th[1:])
    assert skm.auc(fpr, tpr) == pytest.approx(metrics.roc_auc(y, s), abs=1e-12)
    precision, recall, th = metrics.precision_recall_curve(y, s)
    sk_p, sk_r, sk_th = skm.precision_recall_curve(y, s)  # increasing thresholds, ending at (1, 0)
    np.testing.assert_allclose(precision, sk_p[:-1][::-1])
    np.testing.assert_allclose(recall, sk_r[:-1][::-1])
    np.testing.assert_allclose(th, sk_th[::-1])
