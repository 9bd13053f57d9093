"""Test setup: 8 fake CPU devices (before jax is imported) and shared tiny datasets."""

import os

# 8 fake CPU devices; LLVM's optimizations off: the tests' models are tiny and compiling them is most of the
# suite's time (measured on the 4-modality smoke model: train step compile 57 s -> 25 s, init 31 s -> 14 s).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
    from mmjax.data import pipeline

    return pipeline.load_builder("synthetic_patients/tiny", str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def tiny_spec(tiny_builder):
    from mmjax.data import pipeline

    return pipeline.DatasetSpec.from_builder(tiny_builder)


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (pytest-xdist) the tests that share a module-scoped fixture
    (a trained run, a prepared dataset) go to one worker, so it is built once; the others spread."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d and d[-1].scope == "module" for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
