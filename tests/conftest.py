"""Test setup: 8 fake CPU devices (before jax is imported) and shared tiny datasets."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
