"""Real files through the manifest path: the CinC 2021 sample (12-lead WFDB ECGs, age and sex from the
headers) from the experiment's config to contract batches. Skips when ../shared/data is absent.
(Training on a manifest dataset is covered by tests/test_manifest.py; `python launch.py
--config=experiments/cinc2021.py` runs it on these files.)"""

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CINC = ROOT.parent / "shared" / "data" / "cinc2021_sample"


def _experiment(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not CINC.is_dir(), reason=f"{CINC} is absent (public data copy not available)")
def test_cinc2021_ecg_and_demographics_through_the_manifest_path(tmp_path):
    from mmjax.batch import validate_batch
    from mmjax.data import pipeline, sources
    from mmjax.data.spec import DatasetSpec

    config = _experiment("cinc2021").get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    builder = sources.builder_from_config(config.data)
    spec = DatasetSpec.from_builder(builder)
    ecg, demo = spec.modality("ecg"), spec.modality("demographics")
    assert ecg.shape == (1000, 12) and ecg.rate == 100.0 and ecg.channel_names[:3] == ("I", "II", "III")
    assert demo.numeric == ("age",) and demo.categorical == ("sex",) and set(demo.categories[0]) <= {"Female", "Male"}
    assert sum(spec.split_sizes.values()) == 50
    # The raw example holds the whole 10 s record resampled 500 -> 100 Hz, in mV.
    src = builder.as_data_source("train")
    ex = src[0]
    assert ex["modalities"]["ecg"].shape == (1000, 12)
    assert 0.05 < float(np.abs(ex["modalities"]["ecg"]).max()) < 20.0  # millivolts, not ADC units

    batch = next(pipeline.eval_batches(builder, spec, "train", 16, shard_index=0, shard_count=1))
    validate_batch(batch, spec.tasks, spec.modalities)
    real = batch["example_mask"]
    assert batch["ecg"]["mask"][real].all() and batch["ecg"]["values"].shape == (16, 1000, 12)
    np.testing.assert_allclose(batch["ecg"]["values"][real].mean(axis=1), 0.0, atol=1e-4)  # standardized per lead
    assert (batch["demographics"]["categories"][real, 0] >= 2).all()  # every training sex value is known
