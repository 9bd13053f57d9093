"""Real files end to end: the CinC 2021 sample (12-lead WFDB ECGs, age and sex from the headers)
through the manifest path and the launcher's training loop. Skips when ../shared/data is absent."""

import importlib.util
import json
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
def test_cinc2021_ecg_and_demographics_train_through_the_manifest_path(tmp_path):
    from mmjax.data import pipeline
    from mmjax.data.spec import DatasetSpec
    from mmjax.training.train import train_and_evaluate

    config = _experiment("cinc2021").get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    builder = pipeline.builder_from_config(config.data)
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

    results = train_and_evaluate(config, str(tmp_path / "work"))
    assert np.isfinite(results["test"]["dx"]["macro_auprc"])
    saved = DatasetSpec.load(str(tmp_path / "work" / "dataset_spec.json"))
    assert saved.modality("ecg") == ecg
    with open(tmp_path / "work" / "results.json") as f:
        assert json.load(f)["run"]["train_step_recompilations_after_first_step"] == 0
