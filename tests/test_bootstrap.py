"""Patient-level bootstrap: coverage on a simulated case, patients kept whole, chunking invariance,
paired differences; DeLong's test against a direct implementation."""

import numpy as np
import pytest
from scipy import stats

from mmjax import metrics
from mmjax.metrics import bootstrap


def test_counts_keep_a_patients_rows_together_and_draw_every_patient_count_once():
    groups = np.array(["a", "b", "b", "c", "c", "c", "d"])
    rng = np.random.default_rng(0)
    inverse, g = bootstrap.group_index(groups)
    counts = bootstrap.draw_counts(rng, inverse, g, 50)
    assert counts.shape == (50, 7) and g == 4
    for rows in ([1, 2], [3, 4, 5]):
        assert np.all(counts[:, rows] == counts[:, rows[:1]])
    per_patient = counts[:, [0, 1, 3, 6]]
    np.testing.assert_array_equal(per_patient.sum(1), 4)  # G draws of G patients
    assert len({tuple(c) for c in per_patient}) > 10  # resamples differ


def test_resamples_do_not_depend_on_the_chunk_size():
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 80), rng.normal(size=80)
    groups = rng.integers(0, 50, 80)
    fn = lambda w: {"auroc": metrics.roc_auc(y, s, w), "n": 80}
    a = bootstrap.resample(fn, groups, 100, seed=3)
    b = bootstrap.resample(fn, groups, 100, seed=3, chunk=7)
    np.testing.assert_array_equal(a["auroc"], b["auroc"])
    assert a["auroc"].shape == (100,) and a["n"] == 80
    c = bootstrap.resample(fn, groups, 100, seed=4)
    assert not np.array_equal(a["auroc"], c["auroc"])


def test_intervals_cover_the_true_auroc_and_mean_at_about_the_nominal_rate():
    """Binormal scores: AUROC = Phi(d / sqrt(2)). 300 simulated test sets of 150 patients, 300
    resamples each: the 95% intervals should cover the truth ~95% of the time (percentile intervals
    run a little low on small sets; a wrong resampling, e.g. rows of one resample reused, or an
    interval of the wrong width, lands far outside [0.89, 0.99])."""
    rng = np.random.default_rng(0)
    d, n, sims = 1.0, 150, 300
    true_auc = stats.norm.cdf(d / np.sqrt(2))
    hit_auc = hit_mae = 0
    widths = []
    for _ in range(sims):
        y = rng.integers(0, 2, n)
        s = rng.normal(size=n) + d * y
        err = rng.exponential(1.0, n)  # MAE's true value: the mean, 1
        boot = bootstrap.resample(lambda w, y=y, s=s, err=err: {"auroc": metrics.roc_auc(y, s, w),
                                                                "mae": metrics.mae(err, 0 * err, w)},
                                  np.arange(n), 300, seed=int(rng.integers(1 << 30)))
        ci = bootstrap.intervals(boot)
        hit_auc += ci["auroc"]["low"] <= true_auc <= ci["auroc"]["high"]
        hit_mae += ci["mae"]["low"] <= 1.0 <= ci["mae"]["high"]
        widths.append(ci["auroc"]["high"] - ci["auroc"]["low"])
    assert 0.89 <= hit_auc / sims <= 0.99, hit_auc / sims
    assert 0.89 <= hit_mae / sims <= 0.99, hit_mae / sims
    # and the width is what the normal theory says: 2 * 1.96 * Hanley-McNeil standard error
    q1, q2 = true_auc / (2 - true_auc), 2 * true_auc**2 / (1 + true_auc)
    se = np.sqrt((true_auc * (1 - true_auc) + (n / 2 - 1) * (q1 - true_auc**2) + (n / 2 - 1) * (q2 - true_auc**2))
                 / (n / 2) ** 2)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * se, rel=0.12)


def test_undefined_resamples_are_counted_not_averaged():
    y = np.array([0] * 30 + [1])  # one positive: about a third of resamples draw none
    s = np.linspace(0, 1, 31)
    boot = bootstrap.resample(lambda w: {"auroc": metrics.roc_auc(y, s, w)}, np.arange(31), 300)
    ci = bootstrap.intervals(boot)["auroc"]
    assert 60 < ci["undefined"] < 140 and ci["low"] == ci["high"] == 1.0


def test_paired_difference():
    rng = np.random.default_rng(0)
    same = rng.normal(size=200)
    assert bootstrap.paired_difference(same, same, 0.0)["p_value"] == 1.0
    far = bootstrap.paired_difference(same + 1.0, same, 1.0)
    assert far["p_value"] == pytest.approx(1 / 201)
    assert far["low"] == pytest.approx(1.0) and far["high"] == pytest.approx(1.0)
    d = rng.normal(0.1, 0.05, 4000)  # P(d <= 0) = Phi(-2) = 0.0228: p = 0.0455
    near = bootstrap.paired_difference(d, np.zeros_like(d), 0.1)
    assert near["p_value"] == pytest.approx(2 * stats.norm.cdf(-2), abs=0.012)
    assert near["low"] == pytest.approx(0.1 - 1.96 * 0.05, abs=0.01) and near["low"] < near["high"]


def _delong_reference(y, a, b):
    """DeLong et al. (1988) by the definition: psi over every (positive, negative) pair."""
    y = np.asarray(y, bool)
    out = []
    for s in (a, b):
        x, z = s[y][:, None], s[~y][None, :]
        psi = (x > z) + 0.5 * (x == z)  # [m, n]
        out.append((psi.mean(), psi.mean(1), psi.mean(0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = out
    m, n = y.sum(), (~y).sum()
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))
    s = s10 / m + s01 / n
    z = (auc_a - auc_b) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    return auc_a, auc_b, z, 2 * stats.norm.sf(abs(z))


@pytest.mark.parametrize("seed", range(8))
def test_delong_matches_the_pairwise_definition(seed):
    from mmjax.metrics.delong import delong_test

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    y[:4] = [0, 1, 0, 1]
    latent = rng.normal(size=n) + y
    a = np.round(latent + rng.normal(0, 0.5, n), int(rng.integers(0, 3)))  # correlated, with ties
    b = np.round(latent + rng.normal(0, 1.0, n), 1)
    got = delong_test(y, a, b)
    auc_a, auc_b, z, p = _delong_reference(y, a, b)
    assert got["auroc_a"] == pytest.approx(auc_a, abs=1e-12) and got["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert got["auroc_a"] == pytest.approx(metrics.roc_auc(y, a), abs=1e-12)
    assert got["z"] == pytest.approx(z, rel=1e-9) and got["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_delong_of_identical_scores_and_too_few_positives():
    from mmjax.metrics.delong import delong_test

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 50), rng.normal(size=50)
    same = delong_test(y, s, s)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="2 positives"):
        delong_test([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
