"""Cross-validation as one command (mmjax/training/cv.py): every fold trained, each patient scored once
out of fold, pooled metrics and baselines equal to their recomputation, finished folds read back."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = {"name": "cvtest", "id": "pid",
          "modalities": {"labs": {"kind": "tabular", "numeric": ["a", "b"]},
                         "note": {"kind": "text", "column": "note"}},
          "tasks": {"dead": {"kind": "binary", "column": "dead"}}}


@pytest.fixture(scope="session")  # session: not torn down when the worker runs another module's tests between
def cv_run(tmp_path_factory):
    from mmjax.training import cv

    folder = tmp_path_factory.mktemp("cvdata")
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    rows = [{"pid": f"p{i:02d}", "a": f"{a[i]:.4f}", "b": f"{rng.normal():.4f}",
             "note": ("patient sick and unwell" if a[i] + rng.normal() > 0 else "patient stable and well"),
             "dead": "yes" if a[i] + 0.5 * rng.normal() > 0 else "no"} for i in range(60)]
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    (folder / "s.yaml").write_text(yaml.safe_dump(SCHEMA, sort_keys=False))
    spec = importlib.util.spec_from_file_location("manifest_exp", ROOT / "experiments" / "manifest.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    c = exp.get_config("smoke")
    c.data.update(manifest=str(folder / "m.csv"), schema=str(folder / "s.yaml"), data_dir=str(folder / "tfds"),
                  folds=3, split_fractions="train=0.6,validation=0.3,test=0.1")
    c.train.update(batch_size=8, num_steps=2, eval_every=2, checkpoint_every=2, log_every=2)
    c.eval_batch_size = 8
    c.eval.baselines = True
    assert cv.every_fold(c)
    workdir = str(tmp_path_factory.mktemp("cv"))
    messages = []
    out = cv.cross_validate(c, workdir, log=messages.append)
    return c, workdir, out, messages, rows


def test_every_patient_is_scored_once_and_the_pooled_metrics_are_the_recomputed_ones(cv_run):
    from sklearn.metrics import roc_auc_score

    from mmjax.evaluation.records import load_predictions
    from mmjax.experiment import Experiment
    from mmjax.training import cv

    c, workdir, out, messages, rows = cv_run
    z = np.load(os.path.join(workdir, "cv", "predictions.npz"))
    assert sorted(z["patient_id"]) == sorted(r["pid"] for r in rows)  # each patient in exactly one test fold
    assert out["rows"] == out["patients"] == 60 and sorted(set(z["fold"])) == [0, 1, 2]
    known = z["mask/dead"]
    assert out["pooled"]["metrics"]["dead"]["auroc"] == pytest.approx(
        roc_auc_score(z["label/dead"][known], z["pred/dead"][known]), abs=1e-12)
    tasks = Experiment.from_workdir(cv.fold_dir(workdir, 0)).tasks
    for k in range(3):  # the pooled file is the folds' own predictions, in fold order
        preds, _, _, ids = load_predictions(cv.fold_dir(workdir, k), "test", tasks)
        np.testing.assert_array_equal(z["pred/dead"][z["fold"] == k], preds["dead"])
        np.testing.assert_array_equal(z["patient_id"][z["fold"] == k], ids)
        spec = json.load(open(os.path.join(cv.fold_dir(workdir, k), "config.json")))
        assert spec["data"]["fold"] == k
    ci = out["pooled"]["ci"]["dead"]["auroc"]
    assert ci["low"] <= out["pooled"]["metrics"]["dead"]["auroc"] <= ci["high"]
    per_fold = pd.read_csv(os.path.join(workdir, "cv", "per_fold.csv"))
    each = [f["test"]["macro_auroc"] for f in out["per_fold"]]
    assert out["fold_mean"]["mean"] == pytest.approx(np.mean(each), abs=1e-12)
    assert out["fold_mean"]["sd"] == pytest.approx(np.std(each, ddof=1), abs=1e-12)
    assert list(per_fold["fold"]) == [0, 1, 2] and per_fold["rows"].sum() == 60
    assert any("pooled out-of-fold" in m for m in messages)


def test_the_baselines_are_pooled_from_each_folds_own_best(cv_run):
    from mmjax.training import cv

    c, workdir, out, _, _ = cv_run
    versus = out["versus"]
    best = []
    for k in range(3):
        folder = os.path.join(cv.fold_dir(workdir, k), "eval")
        name = json.load(open(os.path.join(folder, "test_baselines.json")))["best"]
        best.append(np.load(os.path.join(folder, "test_baselines.npz"))[f"pred/{name}/dead"])
    z = np.load(os.path.join(workdir, "cv", "predictions.npz"))
    from mmjax.metrics import roc_auc

    known = z["mask/dead"]
    pooled_best = np.concatenate(best)
    assert versus["baselines"]["best of each fold"][cv.POOLED]["metrics"]["dead"]["auroc"] == pytest.approx(
        roc_auc(z["label/dead"][known], pooled_best[known]), abs=1e-12)
    assert "labs: gradient boosting" in versus["baselines"] and "out-of-fold macro_auroc: mmjax" in versus["verdict"]


def test_a_finished_cross_validation_is_read_back_and_reported(cv_run):
    from mmjax.training import cv

    c, workdir, out, _, _ = cv_run
    stamp = os.path.getmtime(os.path.join(cv.fold_dir(workdir, 1), "results.json"))
    messages = []
    again = cv.cross_validate(c, workdir, log=messages.append)
    assert sum("finished" in m for m in messages) == 3  # no fold trained again
    assert os.path.getmtime(os.path.join(cv.fold_dir(workdir, 1), "results.json")) == stamp
    assert again["pooled"]["metrics"] == json.loads(json.dumps(out["pooled"]["metrics"]))
    assert cv.is_cv_root(workdir) and not cv.is_cv_root(cv.fold_dir(workdir, 0))
    page = open(cv.build_report(workdir)).read()
    assert "Pooled out-of-fold metrics" in page and "fold 2:" in page and "Classical baselines" in page


def test_one_fold_of_a_cross_validation_needs_a_fold_to_read_its_data(cv_run):
    from mmjax.data import sources
    from mmjax.data.spec import DataError

    c = cv_run[0].copy_and_resolve_references()
    with pytest.raises(DataError, match=r"folds=3 with no --config.data.fold is the whole cross-validation"):
        sources.builder_from_config(c.data)


def test_the_fold_of_a_run_without_folds_is_no_difference_on_resume():
    from mmjax.config import config_differences

    assert config_differences({"data": {"folds": 0, "fold": 0}}, {"data": {"folds": 0, "fold": -1}}) == []
    assert config_differences({"data": {"folds": 5, "fold": 0}}, {"data": {"folds": 5, "fold": 1}}) == ["data.fold"]


def test_a_workdir_of_one_run_is_not_taken_for_a_cross_validation(cv_run, tmp_path):
    from mmjax.console import UserError
    from mmjax.training import cv

    (tmp_path / "config.json").write_text("{}")  # a one-fold run from before fold=-1 was the default
    with pytest.raises(UserError, match=r"resume it with --config\.data\.fold=0"):
        cv.cross_validate(cv_run[0], str(tmp_path))


def test_a_finished_fold_is_read_back_only_for_its_own_config(cv_run):
    from mmjax.training import cv

    c, workdir = cv_run[0].copy_and_resolve_references(), cv_run[1]
    c.optimizer.learning_rate = 0.5  # not what trained the folds: refused before anything is read or trained
    with pytest.raises(ValueError, match=r"holds a run of another config \(differs in \['optimizer.learning_rate'\]"):
        cv.cross_validate(c, workdir)
