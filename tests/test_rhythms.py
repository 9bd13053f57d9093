"""The simulated ECG rhythms (mmjax/data/synthetic/rhythms.py): each class has the rhythm it claims,
measured with the baselines' neurokit2 features, and the files form a manifest dataset mmjax prepares."""

import numpy as np
import pandas as pd
import pytest


def test_each_simulated_rhythm_has_its_rate_and_regularity(tmp_path):
    pytest.importorskip("neurokit2")
    from mmjax.data.manifest import builder as mb
    from mmjax.data.spec import DatasetSpec
    from mmjax.data.synthetic import rhythms
    from mmjax.evaluation.baselines import ECG_FEATURES, ecg_features

    done = rhythms.write(str(tmp_path / "r"), patients=24, rate=250, seed=1, log=None)
    table = pd.read_csv(done["manifest"])
    assert done["counts"] == {"sinus rhythm": 19, "sinus bradycardia": 2, "sinus tachycardia": 2,
                              "atrial fibrillation": 1}
    assert table["rhythm"].value_counts().to_dict() == {k: v for k, v in done["counts"].items()}
    hr, cv = ECG_FEATURES.index("heart_rate"), ECG_FEATURES.index("rr_cv")
    f = {r.rhythm: [] for r in table.itertuples()}
    for r in table.itertuples():
        x = np.load(tmp_path / "r" / r.ecg)
        assert x.shape == (2500, 12) and x.dtype == np.float32
        f[r.rhythm].append(ecg_features(x[:, 0], 250, intervals=False))  # lead I: the baseline's (unnamed channels)
    rate = {k: np.array([v[hr] for v in vs]) for k, vs in f.items()}
    variation = {k: np.array([v[cv] for v in vs]) for k, vs in f.items()}
    assert rate["sinus bradycardia"].max() < 62 and rate["sinus tachycardia"].min() > 98
    assert 57 < np.median(rate["sinus rhythm"]) < 103
    assert variation["atrial fibrillation"].min() > np.percentile(variation["sinus rhythm"], 90)
    spec = DatasetSpec.from_builder(mb.load(done["manifest"], done["schema"], str(tmp_path / "tfds"), workers=1,
                                            log=lambda *_: None))
    assert spec.modality("ecg").shape == (2500, 12) and spec.tasks[0].label_names == tuple(sorted(rhythms.RHYTHMS))
