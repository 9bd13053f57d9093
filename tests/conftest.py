"""Test setup: 8 fake CPU devices (before jax is imported) and shared tiny datasets."""

import os

# 8 fake CPU devices; LLVM's optimizations off: the tests' models are tiny and compiling them is most of the
# suite's time (measured on the 4-modality smoke model: train step compile 57 s -> 25 s, init 31 s -> 14 s).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One OpenMP thread per test process (scikit-learn's gradient boosting, BLAS): two xdist workers share two
# cores, and OpenMP threads that spin-wait for a core held by the other worker's XLA slowed both ~3x (the
# baselines' fits of a 400-row test set took 82 s instead of ~5 s in a full run).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # JAX's persistent compilation cache, shared by the xdist workers and the subprocesses of one test run
    # (the controller makes it; workers inherit it): many tests compile the same smoke model. Measured: a
    # smoke training run in a fresh process 43 s, 14 s with the cache warm.
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_builder(tmp_path_factory):
    """`synthetic_patients/tiny` prepared once per test session."""
    from mmjax.data import sources

    return sources.load_builder("synthetic_patients/tiny", str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def tiny_spec(tiny_builder):
    from mmjax.data import pipeline

    return pipeline.DatasetSpec.from_builder(tiny_builder)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (pytest-xdist) the tests that share a module-scoped fixture
    (a prepared dataset) or the session's trained run go to one worker, so it is built once; the others
    spread."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if "uninterrupted" in defs:  # the session's shared trained run: trained once, on one worker
            item.add_marker(pytest.mark.xdist_group("trained_run"))
        elif "cv_run" in defs:  # the session's cross-validation (tests/test_cv.py), likewise
            item.add_marker(pytest.mark.xdist_group("cv_run"))
        elif any(d and d[-1].scope == "module" for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def sklearn_metrics(workdir, split: str, tasks) -> dict:
    """The headline metrics of `W/eval/<split>_predictions.npz` recomputed with scikit-learn, as the
    reference for what mmjax wrote: {task: {metric: value}} and 'macro_auroc' (the mean AUROC over
    every classification output with both classes among its known labels)."""
    import numpy as np
    from sklearn import metrics as skm

    z = np.load(os.path.join(workdir, "eval", f"{split}_predictions.npz"))
    out, aurocs = {}, []
    for t in tasks:
        p, y, known = z[f"pred/{t.name}"], z[f"label/{t.name}"], z[f"mask/{t.name}"].astype(bool)
        if t.kind == "regression":
            out[t.name] = {"mae": skm.mean_absolute_error(y[known], p[known])}
        elif t.kind == "multiclass":
            yk, pk = y[known].astype(int), p[known]
            out[t.name] = {"accuracy": skm.accuracy_score(yk, pk.argmax(1))}
            present = np.unique(yk)
            if len(present) > 1:  # one-vs-rest over the classes present, as mmjax's macro_auroc
                out[t.name]["macro_auroc"] = float(np.mean([skm.roc_auc_score(yk == c, pk[:, c]) for c in present]))
                aurocs.append(out[t.name]["macro_auroc"])
        else:
            cols = [(t.name, y, p, known)] if t.kind == "binary" else [
                (label, y[:, k], p[:, k], known[:, k]) for k, label in enumerate(t.label_names)]
            per = {}
            for name, yy, pp, kk in cols:
                if 0 < yy[kk].sum() < kk.sum():
                    per[name] = skm.roc_auc_score(yy[kk], pp[kk])
            aurocs += list(per.values())
            out[t.name] = {"auroc": per[t.name]} if t.kind == "binary" and per else {
                "macro_auroc": float(np.mean(list(per.values())))} if per else {}
    out["macro_auroc"] = float(np.mean(aurocs))
    return out


@pytest.fixture
def recomputed():
    return sklearn_metrics
