"""The `synthetic_patients` generator and builder: determinism, documented statistics, structure."""

import numpy as np
import pytest

from mmjax.data.synthetic.generate import MODALITIES, GenerationSettings, generate_split
from mmjax.data.synthetic.labs import FEATURES
from mmjax.data.synthetic.latent import CONDITIONS


@pytest.fixture(scope="module")
def train_columns():
    return generate_split(GenerationSettings(), "train", 3000)


def test_generation_is_deterministic_and_splits_differ():
    s = GenerationSettings(image_size=32)
    a, _ = generate_split(s, "validation", 64)
    b, _ = generate_split(s, "validation", 64)
    c, _ = generate_split(s, "test", 64)
    for key in ("image", "labs", "ecg", "diagnosis", "severity"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["note"] == b["note"]
    assert not np.array_equal(a["image"], c["image"])
    d, _ = generate_split(GenerationSettings(image_size=32, seed=1), "validation", 64)
    assert not np.array_equal(a["ecg"], d["ecg"])


def test_builds_are_identical(tiny_builder, tmp_path):
    from mmjax.data import sources

    again = sources.load_builder("synthetic_patients/tiny", str(tmp_path))
    assert again.info.metadata["modalities"] == tiny_builder.info.metadata["modalities"]  # vocab, statistics
    assert again.info.metadata["tasks"] == tiny_builder.info.metadata["tasks"]
    for split in ("train", "validation", "test"):
        a, b = tiny_builder.as_data_source(split), again.as_data_source(split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            ea, eb = a[i], b[i]
            assert ea["patient_id"] == eb["patient_id"] and ea["note"] == eb["note"]
            for key in ("image", "labs", "ecg"):
                np.testing.assert_array_equal(ea[key], eb[key])
            np.testing.assert_array_equal(ea["labels"]["diagnosis"], eb["labels"]["diagnosis"])


def test_label_statistics_within_documented_ranges(train_columns):
    cols, state = train_columns
    prevalence = cols["diagnosis"].mean(0)
    assert cols["diagnosis"].shape == (3000, len(CONDITIONS))
    assert np.all((prevalence > 0.08) & (prevalence < 0.30)), dict(zip(CONDITIONS, prevalence))
    assert 1.5 < cols["severity"].mean() < 3.0 and cols["severity"].min() >= 0 and cols["severity"].max() < 15
    known = cols["mortality_known"]
    assert 0.87 < known.mean() < 0.93
    assert 0.08 < cols["mortality"][known].mean() < 0.22
    # Mortality follows severity.
    assert cols["severity"][cols["mortality"] == 1].mean() > cols["severity"][cols["mortality"] == 0].mean() + 1
    # Sepsis only with an infection.
    assert not np.any(state.sepsis & ~(state.pneumonia | state.uti))


def test_modality_presence_rates_and_content(train_columns):
    cols, _ = train_columns
    rates = dict(GenerationSettings().missing_rates)
    present = np.stack([cols["present"][m] for m in MODALITIES])
    assert present.any(axis=0).all(), "every patient has at least one modality"
    for m, p in zip(MODALITIES, present):
        assert abs((1 - p.mean()) - rates[m]) < 0.03, m
    img, ecg = cols["present"]["image"], cols["present"]["signal"]
    assert np.all(cols["image"][~img] == 0) and np.all(cols["image"][img].std(axis=(1, 2, 3)) > 5)
    assert np.all(cols["ecg"][~ecg] == 0)
    assert np.all(np.isnan(cols["labs"][~cols["present"]["tabular"]]))
    assert all(n == "" for n, p in zip(cols["note"], cols["present"]["text"]) if not p)
    assert all(len(n) > 20 for n, p in zip(cols["note"], cols["present"]["text"]) if p)


def test_labs_ranges_missingness_and_correlations(train_columns):
    cols, state = train_columns
    labs = cols["labs"][cols["present"]["tabular"]]
    for j, f in enumerate(FEATURES):
        col = labs[:, j]
        observed = col[~np.isnan(col)]
        assert np.all((observed >= f.low) & (observed <= f.high)), f.name
        assert abs(np.isnan(col).mean() - f.missing_rate) < 0.04, f.name
    names = [f.name for f in FEATURES]
    tab = cols["present"]["tabular"]
    bnp = cols["labs"][:, names.index("bnp")]
    hf = state.heart_failure
    assert np.nanmedian(bnp[tab & hf]) > 3 * np.nanmedian(bnp[tab & ~hf])
    log = lambda k: np.log(cols["labs"][:, names.index(k)])
    for a, b, lo in (("wbc", "crp", 0.2), ("creatinine", "potassium", 0.4)):  # shared causes, shared noise
        x, y = log(a), log(b)
        ok = ~np.isnan(x) & ~np.isnan(y)
        assert np.corrcoef(x[ok], y[ok])[0, 1] > lo, (a, b)


def test_images_show_findings(train_columns):
    cols, state = train_columns
    img, ok = cols["image"][..., 0].astype(np.float32), cols["present"]["image"]
    h = img.shape[1]
    # A wider heart covers the lung beside it: that region brightens with the cardiothoracic ratio.
    beside_heart = img[:, int(h * 0.57):int(h * 0.63), int(h * 0.66):int(h * 0.73)].mean(axis=(1, 2))
    assert np.corrcoef(beside_heart[ok], state.cardiothoracic_ratio[ok])[0, 1] > 0.3
    # Effusion fills the lung bases.
    base = img[:, int(h * 0.66):int(h * 0.74), int(h * 0.1):int(h * 0.3)].mean(axis=(1, 2))
    big = ok & (state.effusion_size > 0.5) & (state.effusion_side != 1)
    assert base[big].mean() > base[ok & ~state.effusion].mean() + 5


def _rr_irregularity(x, hz):
    """Coefficient of variation of RR intervals; R peaks found as the steepest slopes."""
    slope = np.abs(np.diff(x))
    thr = 0.35 * np.percentile(slope, 99.5)
    above = np.where(slope > thr)[0]
    peaks = [p for k, p in enumerate(above) if k == 0 or p - above[k - 1] > 0.25 * hz]
    rr = np.diff(peaks)
    return rr.std() / rr.mean() if len(rr) > 2 else np.nan


def test_ecg_rhythm_structure(train_columns):
    cols, state = train_columns
    idx = np.where(cols["present"]["signal"])[0][:400]
    cv = np.array([_rr_irregularity(cols["ecg"][i], 100) for i in idx])
    af = state.af_during_ecg[idx]
    assert np.nanmedian(cv[af]) > 2 * np.nanmedian(cv[~af])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="image_size"):
        GenerationSettings(image_size=512)
    with pytest.raises(ValueError, match="unknown modalities"):
        GenerationSettings(missing_rates=(("xray", 0.1),))
    with pytest.raises(ValueError, match=r"missing_rates\['text'\]"):
        GenerationSettings(missing_rates=(("text", 1.5),))


def test_registered_with_tfds(tiny_builder):
    import tensorflow_datasets as tfds

    import mmjax.data  # noqa: F401

    assert "synthetic_patients" in tfds.list_builders(with_community_datasets=False)
    b = tfds.builder("synthetic_patients/tiny", data_dir=tiny_builder.data_dir_root)
    assert b.info.splits["train"].num_examples == 256
    assert b.info.features["image"].shape == (32, 32, 1)
    assert b.info.version == "1.1.0"


def test_metadata_is_the_dataset_spec_fitted_on_the_training_split(tiny_builder, tiny_spec, tmp_path):
    from mmjax.data.spec import DatasetSpec

    assert [(m.name, m.kind, m.field) for m in tiny_spec.modalities] == [
        ("image", "image", "image"), ("text", "text", "note"), ("tabular", "tabular", "labs"),
        ("signal", "signal", "ecg")]
    assert tiny_spec.modality("image").shape == (32, 32, 1) and tiny_spec.modality("signal").shape == (1000, 1)
    assert tiny_spec.split_sizes == {"train": 256, "validation": 96, "test": 120}
    src = tiny_builder.as_data_source("train")
    rows = [src[i] for i in range(len(src))]
    diagnosis = np.stack([r["labels"]["diagnosis"] for r in rows])
    severity = np.array([r["labels"]["severity"] for r in rows], np.float64)
    known = np.array([r["label_known"]["mortality"] for r in rows])
    mortality = np.array([r["labels"]["mortality"] for r in rows])
    tasks = {t.name: t for t in tiny_spec.tasks}
    assert tasks["diagnosis"].class_counts == tuple(diagnosis.sum(0).astype(int))
    assert tasks["mortality"].class_counts == (int(mortality[known].sum()),)
    assert tasks["severity"].target_mean == pytest.approx(severity.mean(), rel=1e-5)
    assert tasks["severity"].target_std == pytest.approx(severity.std(), rel=1e-5)
    with_text = sum(bool(r["present"]["text"]) for r in rows)
    assert sum(tiny_spec.modality("text").length_counts) == with_text
    # The spec survives its metadata and JSON round trips unchanged.
    assert DatasetSpec.from_metadata(tiny_spec.to_metadata()) == tiny_spec
    tiny_spec.save(str(tmp_path / "spec.json"))
    assert DatasetSpec.load(str(tmp_path / "spec.json")) == tiny_spec


def test_the_large_variant_adds_leads_and_visits_without_changing_the_rest():
    """`synthetic_patients/large`'s 12 leads are projections of the simulated lead II (kept as it is:
    the same recordings as the one-lead settings give), aVR inverted against II; its notes are the
    one-visit notes followed by follow-up visits; everything else is what the same seed gives."""
    from mmjax.data.synthetic.ecg import LEADS

    base, _ = generate_split(GenerationSettings(image_size=32, ecg_hz=200), "train", 32)
    large, _ = generate_split(GenerationSettings(image_size=32, ecg_hz=200, ecg_leads=12, note_visits=3), "train", 32)
    assert large["ecg"].shape == (32, 2000, 12) and base["ecg"].shape == (32, 2000)
    np.testing.assert_array_equal(large["ecg"][:, :, LEADS.index("II")], base["ecg"])
    for key in ("image", "labs", "diagnosis", "severity"):
        np.testing.assert_array_equal(large[key], base[key])
    has = large["present"]["signal"]
    r = [np.corrcoef(e[:, LEADS.index("II")], e[:, LEADS.index("aVR")])[0, 1] for e in large["ecg"][has]]
    assert np.median(r) < -0.5
    assert np.all(large["ecg"][~has] == 0)
    for a, b in zip(base["note"], large["note"]):
        assert (a == b == "") or (b.startswith(a + " Follow-up visit 1: ") and "Follow-up visit 2: " in b)
    with pytest.raises(ValueError, match="ecg_leads=3"):
        GenerationSettings(ecg_leads=3)


def test_the_large_experiment_is_a_118m_parameter_model_at_a_real_studys_sizes():
    """experiments/large.py on `synthetic_patients/large`'s spec (fitted on a few generated patients, no
    data prepared): ~118M parameters, a 224x224 image, 512 tokens, a 12-lead 10 s ECG at 500 Hz, bf16."""
    import jax

    from experiments import large
    from mmjax.data.spec import DatasetSpec
    from mmjax.data.synthetic.builder import SyntheticPatients, fit_metadata
    from mmjax.experiment import Experiment

    cfg = SyntheticPatients.builder_configs["large"]
    columns, _ = generate_split(cfg.settings, "train", 8)
    spec = DatasetSpec.from_metadata(fit_metadata(columns, cfg))
    exp = Experiment.from_spec(spec, large.get_config())
    count = sum(x.size for x in jax.tree.leaves(exp.abstract_params()))
    assert 117e6 < count < 119.5e6, count
    batch = exp.template_batch()
    assert batch["image"]["values"].shape[1:] == (224, 224, 1) and batch["text"]["values"].shape[1:] == (512,)
    assert batch["signal"]["values"].shape[1:] == (5000, 12)
    assert exp.model.dtype == "bfloat16" and exp.model.remat == ()
    assert Experiment.from_spec(spec, large.get_config("remat")).model.remat == ("encoders", "fusion")
