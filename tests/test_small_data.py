"""Defaults for a few hundred patients: ECGs prepared at 100 Hz (data.ecg_rate) and the small-data recipe
(config.recipe): what each changes, only where the config left the default, and how it is recorded."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.signal import resample_poly

from mmjax.console import ConfigError
from mmjax.data.manifest import builder as mb
from mmjax.data.manifest.schema import cap_ecg_rate, load_schema, looks_like_ecg
from mmjax.data.spec import DatasetSpec
from mmjax.experiment import SMALL_DATA_ROWS, small_data_recipe
from tests.test_training import smoke_config

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _schema(tmp_path, modalities):
    (tmp_path / "m.csv").write_text("id\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "id": "id", "modalities": modalities,
                                    "tasks": {"y": {"kind": "binary", "column": "y"}}}))
    return load_schema(str(path), str(tmp_path / "m.csv"))


def test_only_ecgs_above_the_cap_are_capped_and_keep_their_files_rate(tmp_path):
    schema = _schema(tmp_path, {
        "ecg": {"kind": "signal", "column": "a", "rate": 500, "seconds": 10, "channels": 12},
        "leads": {"kind": "signal", "column": "b", "rate": 1000, "seconds": 5, "channels": LEADS[:3],
                  "file_rate": 2000},
        "pcg": {"kind": "signal", "column": "c", "rate": 2000, "seconds": 5, "channels": 1},  # heart sounds
        "ekg_slow": {"kind": "signal", "column": "d", "rate": 50, "seconds": 10, "channels": 1},
    })
    capped, before = cap_ecg_rate(schema, 100)
    assert before == {"ecg": 500, "leads": 1000}
    assert capped.modalities["ecg"]["rate"] == 100 and capped.modalities["ecg"]["file_rate"] == 500
    assert capped.modalities["leads"]["rate"] == 100 and capped.modalities["leads"]["file_rate"] == 2000
    assert capped.modalities["pcg"] == schema.modalities["pcg"]
    assert capped.modalities["ekg_slow"] == schema.modalities["ekg_slow"]  # below the cap: never upsampled
    assert schema.modalities["ecg"]["rate"] == 500  # the schema given is not changed
    assert cap_ecg_rate(schema, 0) == (schema, {})
    assert looks_like_ecg("signal", ["V1", "v2"]) and not looks_like_ecg("signal", ["x", "V1"])


@pytest.fixture(scope="module")
def ecgs(tmp_path_factory):
    """Twelve 10 s two-lead recordings at 500 Hz (.npy: no header, the schema's rate is the file's) with an
    imbalanced three-class label."""
    folder = tmp_path_factory.mktemp("ecgs")
    t = np.arange(5000) / 500
    rows = []
    (folder / "r").mkdir()
    for i in range(12):
        x = np.stack([np.sin(2 * np.pi * (1 + i) * t), np.cos(2 * np.pi * 3 * t) + 0.1 * i], 1).astype(np.float32)
        np.save(folder / "r" / f"{i}.npy", x)
        rows.append({"id": f"p{i}", "ecg": f"r/{i}.npy", "y": "abbbbbbccbac"[i], "split": "train" if i < 9 else "test"})
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    (folder / "s.yaml").write_text(yaml.safe_dump({
        "name": "ecgs", "id": "id", "split": "split",
        "modalities": {"ecg": {"kind": "signal", "column": "ecg", "rate": 500, "seconds": 10, "channels": 2}},
        "tasks": {"y": {"kind": "multiclass", "column": "y"}}}))
    return folder


def test_a_500_hz_ecg_is_prepared_at_100_hz_as_scipy_resamples_it(ecgs, tmp_path):
    from mmjax.data import transforms as T

    messages = []
    builder = mb.load(str(ecgs / "m.csv"), str(ecgs / "s.yaml"), str(tmp_path / "tfds"), ecg_rate=100,
                      workers=1, log=messages.append)
    spec = DatasetSpec.from_builder(builder)
    m = spec.modality("ecg")
    assert m.shape == (1000, 2) and m.rate == 100
    assert any("500 Hz in the schema, prepared at 100 Hz" in line for line in messages)
    source = builder.as_data_source("train")
    for i in range(len(source)):
        ex = source[i]
        pid = ex["patient_id"].decode() if isinstance(ex["patient_id"], bytes) else str(ex["patient_id"])
        expected = resample_poly(np.load(ecgs / "r" / f"{pid[1:]}.npy").astype(np.float64), 1, 5, axis=0)
        got = np.asarray(T.get_field(ex, m.field), np.float64).reshape(-1, 2)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    # without the cap: the schema's rate, in another prepared dataset
    spec500 = DatasetSpec.from_builder(mb.load(str(ecgs / "m.csv"), str(ecgs / "s.yaml"), str(tmp_path / "tfds"),
                                               workers=1, log=lambda *_: None))
    assert spec500.modality("ecg").shape == (5000, 2)


@dataclasses.dataclass
class _Task:
    name: str
    kind: str
    num_outputs: int = 4
    class_counts: tuple = (5, 3, 200, 40)


def test_the_recipe_changes_only_defaults_and_only_for_small_training_sets(tiny_builder, tiny_spec):
    config = smoke_config(tiny_builder)
    tasks = [_Task("diagnosis", "multilabel"), _Task("rhythm", "multiclass")]
    names = [m.name for m in tiny_spec.modalities]
    config.recipe = "auto"
    rows = tiny_spec.split_sizes["train"]
    assert rows < SMALL_DATA_ROWS
    done = small_data_recipe(config, tiny_spec, tasks, names)
    assert done == {"name": "small", "train_rows": rows, "changes": {
        "model.signal.encoder": "resnet1d", "model.signal.stages": "small", "loss.class_weights": "rhythm=balanced"}}
    assert small_data_recipe(config, tiny_spec, tasks, ["image", "tabular"])["changes"] == {
        "loss.class_weights": "rhythm=balanced"}  # no signal modality: no encoder to change
    config.model.signal.encoder = "inception1d"
    config.loss.class_weights = "rhythm=1:2:1:1"
    assert small_data_recipe(config, tiny_spec, tasks, names)["changes"] == {}  # the config's own choices stay
    more = tasks + [_Task("grade", "multiclass", 3, (4, 9, 1)), _Task("stage", "multiclass", 3, (4, 0, 1))]
    assert small_data_recipe(config, tiny_spec, more, names)["changes"] == {  # task by task; 'stage' lacks a class
        "loss.class_weights": "rhythm=1:2:1:1,grade=balanced"}
    config.model.signal.update(encoder="signal", stages="34")
    assert small_data_recipe(config, tiny_spec, tasks, names)["changes"] == {"model.signal.encoder": "resnet1d"}
    assert small_data_recipe(smoke_config(tiny_builder), tiny_spec, tasks, names)["changes"] == {}  # standard
    config.model.signal.stages = "18"
    config.model.per_modality = '{"signal": {"patch_size": 25}}'  # settings for the signal's own encoder
    assert small_data_recipe(config, tiny_spec, tasks, names)["changes"] == {}
    big = dataclasses.replace(tiny_spec, split_sizes={**tiny_spec.split_sizes, "train": SMALL_DATA_ROWS})
    auto = smoke_config(tiny_builder)
    auto.recipe = "auto"
    assert small_data_recipe(auto, big, tasks, names) == {"name": "standard", "train_rows": SMALL_DATA_ROWS,
                                                          "changes": {}}
    auto.data.label_fraction = 0.5  # the rows trained on count
    assert small_data_recipe(auto, big, tasks, names)["name"] == "small"
    auto.recipe = "tiny"
    with pytest.raises(ConfigError, match="recipe"):
        small_data_recipe(auto, big, tasks, names)


def test_the_model_and_loss_follow_the_recipe(ecgs, tmp_path, capsys):
    from experiments import manifest
    from mmjax import losses
    from mmjax.experiment import Experiment
    from mmjax.training.train import init_or_restore

    config = manifest.get_config("smoke")
    config.data.update(manifest=str(ecgs / "m.csv"), schema=str(ecgs / "s.yaml"), data_dir=str(tmp_path / "tfds"))
    config.recipe = "auto"
    exp = Experiment.from_config(config)
    assert exp.recipe["name"] == "small" and exp.recipe["train_rows"] == 9
    assert exp.model.encoders["ecg"]["name"] == "resnet1d" and exp.model.encoders["ecg"]["stages"] == "small"
    assert config.model.signal.encoder == "signal"  # the config is not changed: it keeps what the user gave
    task = exp.tasks[0]
    w = np.asarray(exp.class_weights["y"])
    np.testing.assert_allclose(w, losses.class_weights(task, "balanced", exp.spec.split_sizes["train"]))
    np.testing.assert_allclose(w, [9 / (3 * 1), 9 / (3 * 6), 9 / (3 * 2)], rtol=1e-6)  # a 1, b 6, c 2 in train
    run = init_or_restore(config, str(tmp_path / "w"))
    run.manager.close()
    assert ("Small-data recipe (9 training rows; --config.recipe=standard turns it off): model.signal.encoder="
            "resnet1d, model.signal.stages=small, loss.class_weights=y=balanced") in capsys.readouterr().out


def test_a_workdir_from_before_the_recipe_resumes_when_nothing_resolves_differently(ecgs, tmp_path):
    """`recipe` and `data.ecg_rate` are compared by what they do on the workdir's saved spec and schema."""
    import json
    import shutil

    from experiments import manifest
    from mmjax.experiment import SCHEMA_FILE, SPEC_FILE, Experiment, resolved_differences

    config = manifest.get_config("smoke")
    config.data.update(manifest=str(ecgs / "m.csv"), schema=str(ecgs / "s.yaml"), data_dir=str(tmp_path / "tfds"))
    exp = Experiment.from_config(config, str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    exp.spec.save(str(tmp_path / "w" / SPEC_FILE))
    shutil.copyfile(ecgs / "s.yaml", tmp_path / "w" / SCHEMA_FILE)
    old = json.loads(config.to_json_best_effort())
    del old["recipe"], old["data"]["ecg_rate"]  # a config saved before these settings existed
    w = str(tmp_path / "w")
    now = config.copy_and_resolve_references()
    now.data.ecg_rate = 0
    assert resolved_differences(old, now, w) == []  # smoke: recipe standard; no ECG cap: as before
    now.data.ecg_rate = 100  # the 500 Hz ECG would now be prepared at 100 Hz
    assert resolved_differences(old, now, w) == ["data.ecg_rate"]
    now.data.ecg_rate, now.recipe = 0, "auto"  # 9 training rows: the small-data recipe changes the model
    assert resolved_differences(old, now, w) == ["recipe"]
    old["recipe"] = "small"
    assert resolved_differences(old, now, w) == []  # 'auto' and 'small' give the same model here
