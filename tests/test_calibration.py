"""Calibration and operating points: ECE on a hand-computed case, Brier, temperature scaling
recovering a known temperature, thresholds against scikit-learn's ROC curve."""

import numpy as np
import pytest
from sklearn import metrics as skm

from mmjax.metrics import calibration as cal


def test_ece_and_reliability_on_a_hand_computed_case():
    # bins of width 0.5: [0, 0.5) holds p = 0.1, 0.2, 0.4 (mean 0.2333) with labels 0, 0, 1 (1/3);
    # [0.5, 1] holds 0.6, 0.9, 1.0 (mean 0.8333) with labels 1, 1, 0 (2/3)
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.2, 0.4, 0.6, 0.9, 1.0])
    r = cal.reliability(y, p, bins=2)
    assert r["count"] == [3, 3]
    np.testing.assert_allclose(r["mean_predicted"], [0.7 / 3, 2.5 / 3])
    np.testing.assert_allclose(r["observed"], [1 / 3, 2 / 3])
    assert cal.ece(y, p, bins=2) == pytest.approx(0.5 * abs(0.7 / 3 - 1 / 3) + 0.5 * abs(2.5 / 3 - 2 / 3))
    assert cal.brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    assert cal.ece([0, 1], [0.0, 1.0]) == 0.0


def test_temperature_scaling_recovers_the_temperature_that_miscalibrated_the_scores():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = rng.random(20000) < cal.sigmoid(z)  # calibrated at T = 1
    over = cal.sigmoid(z * 2.5)  # overconfident: logits x 2.5
    t = cal.fit_temperature(y, over)
    assert t == pytest.approx(2.5, rel=0.05)
    assert cal.ece(y, cal.scale(over, t)) < 0.3 * cal.ece(y, over)


def test_multiclass_temperature_top_label_ece_and_brier():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (20000, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])  # calibrated at T = 1
    over = cal.scale_multiclass(p, 1 / 2.5)  # overconfident: logits x 2.5
    t = cal.fit_temperature_multiclass(y, over)
    assert t == pytest.approx(2.5, rel=0.05)
    np.testing.assert_allclose(cal.scale_multiclass(over, t), p, atol=0.02)
    raw, fixed = cal.multiclass_calibration(y, over), cal.multiclass_calibration(y, cal.scale_multiclass(over, t))
    assert fixed["ece"] < 0.3 * raw["ece"]
    # top-label ECE is the binary ECE of (argmax right, max p); Brier sums over classes
    correct, conf = (over.argmax(1) == y).astype(float), over.max(1)
    assert raw["ece"] == pytest.approx(cal.ece(correct, conf))
    assert raw["brier"] == pytest.approx(np.mean(np.sum((over - np.eye(4)[y]) ** 2, 1)))
    # a 3-row hand case: confidences 0.7 (right), 0.6 (wrong), 0.9 (right) in bins of width 0.5
    hand = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.05, 0.05, 0.9]])
    r = cal.multiclass_calibration(np.array([0, 1, 2]), hand, bins=2)
    assert r["ece"] == pytest.approx(abs((0.7 + 0.6 + 0.9) / 3 - 2 / 3))


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_match_sklearn_roc_curve(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(cal.sigmoid(rng.normal(size=300) + 1.5 * y), 2)  # ties
    fpr, tpr, thr = skm.roc_curve(y, p)
    assert cal.choose_threshold(y, p, "youden") == pytest.approx(thr[np.argmax(tpr - fpr)])
    t = cal.choose_threshold(y, p, "sensitivity", 0.9)
    assert t == pytest.approx(thr[np.argmax(tpr >= 0.9)])
    at = cal.at_threshold(y, p, t)
    assert at["sensitivity"] >= 0.9 and at["tp"] + at["fn"] == y.sum()
    hard = p >= t
    assert at["ppv"] == pytest.approx(skm.precision_score(y, hard))
    assert at["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - hard))
    assert at["npv"] == pytest.approx(skm.precision_score(1 - y, 1 - hard))
    with pytest.raises(ValueError, match="rule"):
        cal.choose_threshold(y, p, "f1")
