"""The classical baselines (mmjax/evaluation/baselines.py): their features against references, their fits
against scikit-learn fitted by hand, and that the test split never reaches a fit."""

import dataclasses

import numpy as np
import pytest

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.data.spec import DatasetSpec
from mmjax.evaluation import baselines as B

TASKS = (TaskSpec("dx", "binary"), TaskSpec("rhythm", "multiclass", label_names=("a", "b", "c")),
         TaskSpec("findings", "multilabel", label_names=("x", "y")), TaskSpec("age", "regression"))
SPEC = DatasetSpec("fake", (
    ModalitySpec("labs", "tabular", numeric=("n0", "n1", "n2"), categorical=("sex",), categories=(("f", "m"),)),
    ModalitySpec("note", "text", vocab=("[PAD]", "[UNK]")),
    ModalitySpec("xray", "image", shape=(8, 8, 1), mean=(0.5,), std=(0.2,)),
    ModalitySpec("sound", "signal", shape=(100, 1), rate=100.0, channel_names=("pcg",))), TASKS)
WORDS = np.array(["cough", "fever", "clear", "normal", "effusion", "stable", "pain", "rales"])


def _split(n: int, seed: int) -> B.SplitData:
    """n rows whose labels depend on every modality's features; about a fifth of each modality absent."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    present = {m.name: rng.random(n) > 0.2 for m in SPEC.modalities}
    labs = np.c_[z[:, 0] + 0.3 * rng.normal(size=n), rng.normal(size=n), z[:, 1], rng.integers(2, 4, n)]
    labs[rng.random((n, 4)) < 0.1] = np.nan  # values not measured
    notes = [" ".join(WORDS[[int(a > 0), 2 + int(b > 0), 4 + rng.integers(0, 4)]]) for a, b in z[:, 2:]]
    image = np.c_[z[:, 3:4] + 0.5 * rng.normal(size=(n, 1)), rng.normal(size=(n, 5))]
    sound = np.c_[z[:, 0:1] + z[:, 2:3] + rng.normal(size=(n, 1)), rng.normal(size=(n, 3))]
    feats = {"labs": labs, "note": notes, "xray": image, "sound": sound}
    for name, here in present.items():
        if name == "note":
            feats[name] = [t if h else "" for t, h in zip(notes, here)]
        else:
            feats[name] = np.where(here[:, None], feats[name], np.nan)
    score = z.sum(1)
    labels = {"dx": (score + rng.normal(size=n) > 0).astype(float),
              "rhythm": np.digitize(z[:, 0] + z[:, 2], [-0.5, 0.5]).astype(float),
              "findings": np.c_[z[:, 1] > 0, z[:, 3] > 0.3].astype(float), "age": 60 + 10 * z[:, 0] + z[:, 1]}
    masks = {t.name: rng.random(labels[t.name].shape) > 0.1 for t in TASKS}
    ids = np.array([f"{seed}-{i}" for i in range(n)])
    return B.SplitData(ids, present, feats, labels, masks, {})


@pytest.fixture(scope="module")
def data():
    return {"train": _split(400, 0), "validation": _split(150, 1), "test": _split(200, 2)}


@pytest.fixture(scope="module")
def fitted(data):
    return B.fit_predict(data, SPEC, None, TASKS)


def test_the_test_split_never_reaches_a_fit(data, fitted):
    """Changing the test split's labels, and the features of half of its rows, changes no prediction of
    the other rows and no chosen setting: nothing of the test split is fitted on (models, vocabulary,
    scalers, the late fusion's prior)."""
    preds, details = fitted
    test = data["test"]
    rng = np.random.default_rng(9)
    half = np.arange(len(test.ids)) < len(test.ids) // 2
    features = {k: list(v) if isinstance(v, list) else v.copy() for k, v in test.features.items()}
    features["note"] = ["effusion effusion pain" if h else t for t, h in zip(features["note"], half)]
    for k in ("labs", "xray", "sound"):
        features[k][half] = rng.normal(size=features[k][half].shape) * 10
    changed = dataclasses.replace(test, features=features,
                                  labels={k: rng.permutation(v) for k, v in test.labels.items()},
                                  masks={k: rng.permutation(v) for k, v in test.masks.items()})
    again, details_again = B.fit_predict({**data, "test": changed}, SPEC, None, TASKS)
    assert details_again == {k: {**v, "fit_seconds": details_again[k].get("fit_seconds")} if "fit_seconds" in v else v
                             for k, v in details.items()}
    for name in preds:
        for t in TASKS:
            np.testing.assert_array_equal(again[name]["test"][t.name][~half], preds[name]["test"][t.name][~half])
            np.testing.assert_array_equal(again[name]["validation"][t.name], preds[name]["validation"][t.name])
    moved = sum(not np.array_equal(again[n]["test"]["dx"][half], preds[n]["test"]["dx"][half])
                for n in preds if ":" in n)
    assert moved == 4  # the changed rows did change each modality's predictions: the test can fail


def test_tabular_baseline_is_scikit_learn_with_the_setting_chosen_on_validation(data, fitted):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    preds, details = fitted
    name = "labs: gradient boosting"
    tr, va, te = data["train"], data["validation"], data["test"]
    rows = tr.masks["dx"] & tr.present["labs"]
    vrows = va.masks["dx"] & va.present["labs"]
    scores = []
    for setting in B._HGB_GRID:
        model = HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=0,
                                               min_samples_leaf=min(20, rows.sum() // 10),
                                               categorical_features=np.array([False, False, False, True]), **setting)
        model.fit(tr.features["labs"][rows], tr.labels["dx"][rows])
        scores.append((roc_auc_score(va.labels["dx"][vrows], model.predict_proba(va.features["labs"][vrows])[:, 1]),
                       setting, model))
    auc, setting, model = max(scores, key=lambda s: s[0])
    assert details[name]["settings"]["dx"] == [setting]
    here = te.present["labs"]
    np.testing.assert_allclose(preds[name]["test"]["dx"][here], model.predict_proba(te.features["labs"][here])[:, 1],
                               rtol=1e-12)
    prior = tr.labels["dx"][tr.masks["dx"]].mean()
    np.testing.assert_allclose(preds[name]["test"]["dx"][~here], prior)  # no labs: the training prior
    # every modality carries signal in these data: each baseline beats chance on the test split
    from mmjax.metrics import tasks as tm

    for n in ("labs: gradient boosting", "note: TF-IDF + logistic regression", "xray: pixel features + logistic "
              "regression", "sound: signal features + gradient boosting", B.LATE_FUSION):
        assert tm.compute_metrics(preds[n]["test"], te.labels, te.masks, TASKS)["dx"]["auroc"] > 0.6, n


def test_late_fusion_and_the_trivial_baselines(data, fitted):
    preds, _ = fitted
    te, tr = data["test"], data["train"]
    singles = [n for n in preds if ":" in n]
    mods = [n.split(":")[0] for n in singles]
    for t in TASKS:
        stack = np.stack([preds[n]["test"][t.name] for n in singles])
        here = np.stack([te.present[m] for m in mods]).reshape((len(mods), -1) + (1,) * (stack.ndim - 2))
        want = (stack * here).sum(0) / np.maximum(here.sum(0), 1)
        some = here.any(0).reshape(-1)
        np.testing.assert_allclose(preds[B.LATE_FUSION]["test"][t.name][some], want[some], rtol=1e-12)
    y = tr.labels["rhythm"][tr.masks["rhythm"]].astype(int)
    freq = np.bincount(y, minlength=3) / len(y)
    np.testing.assert_allclose(preds["prior"]["test"]["rhythm"], np.tile(freq, (len(te.ids), 1)))
    np.testing.assert_array_equal(preds["majority class"]["test"]["rhythm"].argmax(1), np.argmax(freq))
    assert set(np.unique(preds["majority class"]["test"]["findings"])) <= {0.0, 1.0}
    np.testing.assert_allclose(preds["prior"]["test"]["age"], tr.labels["age"][tr.masks["age"]].mean())


def test_ecg_features_of_a_simulated_ecg():
    """neurokit2's simulated ECGs at known heart rates: the rate comes back within 3 bpm, a regular rhythm
    has a small R-R variation and an irregular one (alternating rates) a large one; the intervals are
    physiological (PQ 50-250 ms, QS 30-150 ms, QT 200-500 ms)."""
    nk = pytest.importorskip("neurokit2")
    names = list(B.ECG_FEATURES)
    for rate, bpm in ((500, 72), (100, 110)):
        x = nk.ecg_simulate(duration=10, sampling_rate=rate, heart_rate=bpm, random_state=1)
        f = dict(zip(names, B.ecg_features(x, rate)))
        assert abs(f["heart_rate"] - bpm) < 3, f
        assert f["rr_cv"] < 0.05 and 50 < f["pq_ms"] < 250 and 30 < f["qs_ms"] < 150 and 200 < f["qt_ms"] < 500, f
    irregular = np.concatenate([nk.ecg_simulate(duration=2, sampling_rate=250, heart_rate=h, random_state=k)
                                for k, h in enumerate([60, 120, 60, 120, 60])])
    f = dict(zip(names, B.ecg_features(irregular, 250, intervals=False)))
    assert len(B.ecg_features(irregular, 250, intervals=False)) == 10 and f["rr_cv"] > 0.15, f
    flat = B.ecg_features(np.zeros(1000), 100)
    assert flat[names.index("beats")] < 3 and np.isnan(flat[0])  # no beats: undefined, not an error
    assert B.is_ecg(ModalitySpec("x", "signal", shape=(10, 2), rate=100.0, channel_names=("I", "aVR")))
    assert not B.is_ecg(SPEC.modality("sound"))


def test_signal_and_image_features():
    rate = 100.0
    t = np.arange(1000) / rate
    x = np.c_[np.sin(2 * np.pi * 10 * t), 3 + 0.0 * t]
    f = B.signal_features(x, rate).reshape(2, 11)  # per channel: 5 statistics, 6 bands
    np.testing.assert_allclose(f[:, 0], x.mean(0), atol=1e-12)
    np.testing.assert_allclose(f[:, 1], x.std(0), atol=1e-12)
    edges = B._band_edges(rate)
    band = np.searchsorted(edges, 10.0) - 1
    assert f[0, 5 + band] > 0.95 and f[0, 5:].sum() <= 1 + 1e-9
    image = np.zeros((32, 32, 3), np.uint8)
    image[:16] = 255  # the top half white
    g = B.image_features(image)
    thumb = g[:256].reshape(16, 16)
    np.testing.assert_allclose(thumb[:8], 1.0)
    np.testing.assert_allclose(thumb[8:], 0.0)
    np.testing.assert_allclose(g[256:272][[0, 15]], [0.5, 0.5])  # the histogram: half at 0, half at 255
    np.testing.assert_allclose(g[272:275], 0.5)  # per-channel means


def test_the_verdict_says_which_is_better_only_when_the_paired_test_does():
    from mmjax.evaluation import records
    from mmjax.evaluation.compare import compare_predictions
    from mmjax.metrics import tasks as tm

    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) > 0.5).astype(float)
    tasks = (TaskSpec("dx", "binary"),)
    good, noise = y + rng.normal(0, 0.5, n), rng.random(n)
    ids = np.array([str(i) for i in range(n)])
    settings = {"resamples": 200, "seed": 0, "level": 0.95}
    labels, masks = {"dx": y}, {"dx": np.ones(n, bool)}

    def out(model, baseline):
        paired = compare_predictions({"dx": model}, {"dx": baseline}, labels, masks, ids, tasks, 200, 0)
        rec = lambda p: records.with_intervals(({"dx": p}, labels, masks, ids), tasks, settings)
        return B.verdict({"metric": "macro_auroc", "best": "b", "split": "test", "chosen_on": "validation",
                          "resamples": 200,
                          "model": rec(model), "baselines": {"b": {"test": rec(baseline)}}, "comparison": paired})

    assert "mmjax is better, p <= 0.005" in out(good, noise)
    assert "the baseline is better, p <= 0.005" in out(noise, good)
    assert "no significant difference" in out(good, good + rng.normal(0, 1e-3, n))
    line = out(noise, good)
    auc = tm.compute_metrics({"dx": good}, labels, masks, tasks)["macro_auroc"]
    assert f"best baseline (b, chosen on validation) {auc:.3f} [" in line


def test_a_modality_absent_from_a_split_an_output_without_validation_rows_and_an_unmeasured_column(data):
    """Data the fits must survive: no validation row has the X-ray, no test row has labs, no validation row
    has a known `dx` label (the first setting is kept), a tabular column was never measured in training
    (left out, with the categorical mask cut to match), and rows with no modality get the prior."""
    tr, va, te = data["train"], data["validation"], data["test"]
    nan = lambda x: np.full_like(x, np.nan)
    labs = tr.features["labs"].copy()
    labs[:, 1] = np.nan
    train = dataclasses.replace(tr, features={**tr.features, "labs": labs})
    none = np.zeros(len(va.ids), bool)
    validation = dataclasses.replace(va, present={**va.present, "xray": none},
                                     features={**va.features, "xray": nan(va.features["xray"])},
                                     masks={**va.masks, "dx": none})
    nobody = {m: np.zeros(len(te.ids), bool) for m in te.present}
    test = dataclasses.replace(te, present={**te.present, "labs": nobody["labs"]},
                               features={**te.features, "labs": nan(te.features["labs"])})
    preds, details = B.fit_predict({"train": train, "validation": validation, "test": test}, SPEC, None, TASKS)
    assert details["labs: gradient boosting"]["settings"]["dx"] == [B._HGB_GRID[0]]
    prior = tr.labels["dx"][tr.masks["dx"]].mean()
    np.testing.assert_allclose(preds["labs: gradient boosting"]["test"]["dx"], prior)
    assert np.isfinite(preds["xray: pixel features + logistic regression"]["validation"]["rhythm"]).all()
    empty = dataclasses.replace(te, present=nobody)  # no modality at all: the late fusion gives the prior
    late = B.fit_predict({"train": tr, "validation": va, "test": empty}, SPEC, None, TASKS)[0][B.LATE_FUSION]
    np.testing.assert_allclose(late["test"]["dx"], prior)
    assert late["test"]["findings"].shape == (len(te.ids), 2)


def test_without_validation_the_best_baseline_is_a_fixed_rule_never_the_evaluated_rows():
    metric = lambda v: {"metrics": {"macro_auroc": v}}
    table = {"a: x": {"test": metric(0.9)}, B.LATE_FUSION: {"test": metric(0.6)}, "prior": {"test": metric(0.5)}}
    assert B.choose_best(table, None, "macro_auroc") == (B.LATE_FUSION, "a fixed rule (no validation metric)")
    with_val = {n: {**r, "validation": metric(v)} for (n, r), v in zip(table.items(), (0.7, 0.8, 0.5))}
    assert B.choose_best(with_val, "validation", "macro_auroc") == (B.LATE_FUSION, "validation")
    rmse = {n: {"validation": {"metrics": {"t": {"rmse": v}}}} for n, v in (("a: x", 2.0), ("b: y", 1.0))}
    assert B.choose_best(rmse, "validation", "t.rmse")[0] == "b: y"  # lower is better
    single = {"a: x": {"test": metric(0.9)}, "prior": {"test": metric(0.5)}}
    assert B.choose_best(single, None, "macro_auroc")[0] == "a: x"


def test_with_intervals_gives_the_records_metrics_and_intervals():
    """The baselines' table reuses the model's eval record; `with_intervals` (the baselines' own and the
    cross-validation's) gives the same metrics and intervals as `records.record` on the same rows."""
    from mmjax.evaluation import records

    rng = np.random.default_rng(3)
    n = 120
    tasks = (TaskSpec("dx", "binary"), TaskSpec("age", "regression"))
    y = (rng.random(n) > 0.6).astype(float)
    collected = ({"dx": np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1), "age": rng.normal(size=n)},
                 {"dx": y, "age": rng.normal(size=n)}, {"dx": rng.random(n) > 0.1, "age": np.ones(n, bool)},
                 np.array([f"p{i // 2}" for i in range(n)]))  # two rows a patient
    settings = {"resamples": 100, "seed": 4, "level": 0.9}
    mine = records.with_intervals(collected, tasks, settings)
    rec = records.record(collected, tasks, 0, resamples=100, seed=4, level=0.9)
    assert mine["metrics"] == rec["metrics"] and mine["ci"] == rec["ci"]


def test_no_resamples_gives_point_differences_and_no_claim():
    from mmjax.evaluation import records
    from mmjax.evaluation.compare import compare_predictions

    rng = np.random.default_rng(5)
    y = (rng.random(80) > 0.5).astype(float)
    tasks, ids = (TaskSpec("dx", "binary"),), np.array([str(i) for i in range(80)])
    labels, masks = {"dx": y}, {"dx": np.ones(80, bool)}
    a, b = {"dx": y + rng.normal(0, 0.3, 80)}, {"dx": rng.random(80)}
    paired = compare_predictions(a, b, labels, masks, ids, tasks, resamples=0)
    m = paired["metrics"]["macro_auroc"]
    assert np.isnan(m["p_value"]) and m["difference"] == pytest.approx(m["a"] - m["b"])
    settings = {"resamples": 0, "seed": 0, "level": 0.95}
    rec = lambda p: records.with_intervals((p, labels, masks, ids), tasks, settings)
    line = B.verdict({"metric": "macro_auroc", "best": "b", "split": "test", "chosen_on": "validation",
                      "model": rec(a), "baselines": {"b": {"test": rec(b)}}, "comparison": paired, "resamples": 0})
    assert line.endswith("no paired test (no intervals)") and "better" not in line
