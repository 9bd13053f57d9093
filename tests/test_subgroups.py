"""Per-subgroup evaluation (mmjax/evaluation/subgroups.py): each group's metrics equal scikit-learn's on
its rows, a permuted group's metric through 0/1 weights is the metric of its rows, the gap's
permutation test finds a real gap and not a made-up one, and the group variables come from the
records and the manifest."""

import types

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mmjax.batch import TaskSpec
from mmjax.console import ConfigError
from mmjax.evaluation import subgroups
from mmjax.metrics import tasks as task_metrics

TASKS = (TaskSpec("died", "binary"), TaskSpec("dx", "multiclass", ("a", "b", "c")))
OPTIONS = {"groups": [], "age_bands": subgroups.AGE_BANDS, "min_patients": 10, "permutations": 400, "resamples": 100,
           "seed": 0, "level": 0.95, "bins": 10, "rule": "youden", "target_sensitivity": 0.9}


def _collected(n=300, seed=0, good=None):
    """Predictions for n rows (two rows per patient); rows where `good` is True are predicted well, the
    others at random."""
    rng = np.random.default_rng(seed)
    good = np.ones(n, bool) if good is None else good
    y = rng.integers(0, 2, n).astype(np.float64)
    p = np.where(good, 0.3 * y + 0.7 * rng.random(n), rng.random(n))
    c = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + np.where(good[:, None], 3.0 * np.eye(3)[c], 0.0)
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    known = rng.random(n) > 0.1
    ids = np.array([f"p{i // 2}" for i in range(n)])
    return ({"died": p, "dx": q}, {"died": y, "dx": c.astype(np.float64)}, {"died": known, "dx": np.ones(n, bool)},
            ids)


def test_each_group_equals_scikit_learn_on_its_rows():
    collected = _collected()
    preds, labels, masks, ids = collected
    groups = np.array(["A", "B", "C"], dtype="<U4")[np.arange(len(ids)) // 2 % 3]  # per patient
    groups[:4] = "tiny"  # two patients: listed, not evaluated
    out = subgroups.analyze_variable(collected, TASKS, groups, OPTIONS)
    assert out["too_small"] == {"tiny": 2} and set(out["groups"]) == {"A", "B", "C"}
    for g, r in out["groups"].items():
        rows = groups == g
        k = rows & masks["died"]
        assert r["metrics"]["died"]["auroc"] == pytest.approx(roc_auc_score(labels["died"][k], preds["died"][k]),
                                                              abs=1e-12)
        assert r["metrics"]["dx"]["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(labels["dx"][rows], preds["dx"][rows].argmax(1)), abs=1e-12)
        assert r["patients"] == len(set(ids[rows])) and r["rows"] == rows.sum()
        assert r["ci"]["died"]["auroc"]["low"] < r["metrics"]["died"]["auroc"] < r["ci"]["died"]["auroc"]["high"]
        cal = r["calibration"]["died"]
        assert cal["observed"] == pytest.approx(labels["died"][k].mean()) and cal["count"] == k.sum()
        assert cal["brier"] == pytest.approx(np.mean((preds["died"][k] - labels["died"][k]) ** 2))
    gap = out["gaps"]["died.auroc"]
    values = {g: r["metrics"]["died"]["auroc"] for g, r in out["groups"].items()}
    assert gap["gap"] == pytest.approx(max(values.values()) - min(values.values()))
    assert gap["best"] == max(values, key=values.get) and gap["worst"] == min(values, key=values.get)
    assert set(out["gaps"]) == {"macro_auroc", "died.auroc", "dx.macro_auroc", "dx.balanced_accuracy"}


def test_a_permuted_group_through_weights_is_the_metric_of_its_rows():
    """The permutation gaps recomputed by hand: the same permutations drawn, each group's rows taken."""
    collected = _collected(n=120)
    preds, labels, masks, ids = collected
    groups = np.array(["x", "y", "z"])[np.arange(len(ids)) // 2 % 3]
    names = ["x", "y", "z"]
    got = subgroups.permutation_gaps(collected, TASKS, groups, names, ["died.auroc", "dx.accuracy"], 5, seed=3,
                                     chunk=5)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)  # patients in sorted id order
    patient_group = groups[first]
    rng = np.random.default_rng(3)
    order = np.argsort(rng.random((5, len(patient_group))), axis=1)
    for r in range(5):
        rows_group = patient_group[order[r]][inverse]
        values = []
        for g in names:
            rows = rows_group == g
            k = rows & masks["died"]
            values.append((roc_auc_score(labels["died"][k], preds["died"][k]),
                           np.mean(preds["dx"][rows].argmax(1) == labels["dx"][rows])))
        values = np.array(values)
        assert got["died.auroc"][r] == pytest.approx(np.ptp(values[:, 0]), abs=1e-12)
        assert got["dx.accuracy"][r] == pytest.approx(np.ptp(values[:, 1]), abs=1e-12)


def test_the_permutation_test_finds_a_real_gap_and_not_a_made_up_one():
    n = 400
    patient = np.arange(n) // 2
    real = np.where(patient % 2 == 0, "well", "badly")  # the model is good on half the patients only
    collected = _collected(n=n, seed=1, good=patient % 2 == 0)
    out = subgroups.analyze_variable(collected, TASKS, real, OPTIONS)
    assert out["gaps"]["died.auroc"]["worst"] == "badly"
    assert out["gaps"]["died.auroc"]["p_value"] == pytest.approx(1 / 401)  # no permutation reaches it
    # a label that has nothing to do with the errors: groups by another, independent draw of patients
    arbitrary = np.where(np.random.default_rng(7).random(n // 2)[patient] < 0.5, "u", "v")
    out = subgroups.analyze_variable(collected, TASKS, arbitrary, OPTIONS)
    assert out["gaps"]["died.auroc"]["p_value"] > 0.05
    perm_free = subgroups.analyze_variable(collected, TASKS, arbitrary, {**OPTIONS, "permutations": 0})
    assert "p_value" not in perm_free["gaps"]["died.auroc"]


def test_a_patient_counts_in_the_group_of_its_first_row():
    """Rows of one patient in two groups (a later visit in another age band): the patient is evaluated in
    its first row's group, the unit the permutation test permutes, and the moved rows are counted."""
    collected = _collected(n=120)
    ids = collected[3]
    groups = np.array(["A", "B"])[np.arange(120) // 2 % 2]
    groups[1] = "B"  # patient p0's second row
    out = subgroups.analyze_variable(collected, TASKS, groups, OPTIONS)
    assert out["moved_rows"] == 1
    assert out["groups"]["A"]["rows"] == 60 and out["groups"]["B"]["rows"] == 60  # p0's two rows both in A
    assert out["groups"]["A"]["patients"] == len(set(ids[groups == "A"])) == 30


def test_age_bands_and_the_table():
    assert [subgroups.age_band(a) for a in (5, 39.9, 40, 59, 60, 79.5, 80, 101, float("nan"), None, "")] == \
        ["<40", "<40", "40-59", "40-59", "60-79", "60-79", ">=80", ">=80", "missing", "missing", "missing"]
    assert subgroups.age_band(50, (18, 65)) == "18-64"
    collected = _collected()
    groups = np.array(["A", "B"])[np.arange(300) // 2 % 2]
    result = subgroups.analyze(collected, TASKS, {"sex": groups, "modalities": np.array(["image"] * 300)}, OPTIONS)
    assert list(result["variables"]) == ["sex"]  # one modality subset: nothing to compare
    text = subgroups.format_table(result)
    assert text.startswith("  sex (macro_auroc): A ") and "(n=75)" in text and "p=" in text


def test_settings_read_the_config():
    import ml_collections

    c = ml_collections.ConfigDict({"eval": {"groups": "site,smoker", "age_bands": "18,65", "min_group_patients": 5}})
    s = subgroups.settings(c, ["dx", "site"])
    assert s["groups"] == ["site", "smoker", "dx"] and s["age_bands"] == (18.0, 65.0) and s["min_patients"] == 5
    for bad in ("65,18", ""):
        c.eval.age_bands = bad
        with pytest.raises(ConfigError, match="eval.age_bands"):
            subgroups.settings(c)


def test_group_variables_come_from_the_manifest(tmp_path):
    from mmjax.data.manifest import builder as mb
    from mmjax.data.spec import DatasetSpec
    from tests.test_manifest import SCHEMA, _rows, _write_csv, _write_schema

    rows = _rows(tmp_path)[0]
    manifest = _write_csv(tmp_path / "manifest.csv", rows)
    builder = mb.load(manifest, _write_schema(tmp_path / "schema.yaml", SCHEMA), str(tmp_path / "tfds"))
    spec = DatasetSpec.from_builder(builder)
    exp = types.SimpleNamespace(builder=builder, spec=spec, modalities=spec.modality_names)
    ids, variables = subgroups.attributes(exp, "test", {**OPTIONS, "groups": ["dx"]})
    by_id = {r["pid"]: r for r in rows}
    expect_sex = [by_id[i]["sex"] or "missing" for i in ids]
    assert list(variables["sex"]) == expect_sex and list(variables["dx"]) == [by_id[i]["dx"] or "missing" for i in ids]
    assert list(variables["site"]) == [by_id[i]["site"] or "missing" for i in ids]
    assert list(variables["age"]) == [subgroups.age_band(by_id[i]["age"] or None) for i in ids]
    present = lambda i, m, col: m if by_id[i][col] else None
    cols = {"frontal": "frontal", "lateral": "lateral", "note": "note", "ecg": "ecg"}
    for i, got in zip(ids, variables["modalities"]):
        labs = any(by_id[i][c] for c in ("age", "crp", "sex", "site"))
        want = [m for m in exp.spec.modality_names if (labs if m == "labs" else present(i, m, cols[m]))]
        assert got == "+".join(want), i
    run = types.SimpleNamespace(builder=builder, spec=spec, modalities=("labs", "ecg"))  # a run on two of five
    assert set(subgroups.attributes(run, "test", OPTIONS)[1]["modalities"]) <= {"labs", "ecg", "labs+ecg", "none"}
    with pytest.raises(ConfigError, match="no column 'smoker'.*pid"):
        subgroups.attributes(exp, "test", {**OPTIONS, "groups": ["smoker"]})
    collected_ids = ids[::-1]
    aligned = subgroups.align(collected_ids, ids, variables)
    assert list(aligned["sex"]) == expect_sex[::-1]


def test_compute_metrics_with_zero_weights_is_the_subset():
    """What the permutation test stands on, for every task kind at once."""
    collected = _collected(n=90)
    preds, labels, masks, _ = collected
    rows = np.arange(90) % 3 != 0
    w = rows[None].astype(np.float64)
    weighted = task_metrics.compute_metrics(preds, labels, masks, TASKS, sample_weight=w)
    subset = task_metrics.compute_metrics(*(({k: v[rows] for k, v in d.items()}) for d in collected[:3]), TASKS)
    for path, value in task_metrics.flat_metrics(subset):
        got = weighted
        for k in path.split("."):
            got = got[k]
        assert float(got[0]) == pytest.approx(value, abs=1e-12, nan_ok=True), path
