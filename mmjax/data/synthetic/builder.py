"""TFDS builder for `synthetic_patients`: simulated multimodal patients, no download needed.

Each example is one patient: a chest-X-ray-like image, a free-text admission note, 16 lab values
and vital signs (NaN where not measured), a 10 s single-lead ECG, age, sex, and a presence flag
per modality. Labels: a 5-condition multi-label diagnosis (pneumonia, heart failure, pleural
effusion, atrial fibrillation, sepsis), a continuous severity score (~0..10), and 30-day
mortality (unknown for ~10% of patients: `label_known/mortality`).

Everything is generated from a latent patient state; `mmjax/data/synthetic/latent.py` documents
which modality reveals what. Several conditions need two modalities together (sepsis: an
infection seen on the image or in the note *and* organ dysfunction seen in the labs; paroxysmal
atrial fibrillation: the ECG or the note). docs/results.md gives the reference upper bound.

Written as array_record and read with `tfds.data_source` / Grain, without TensorFlow. The
training split's fitted preprocessing (WordPiece vocabulary, tabular and image statistics) is
stored in the dataset's metadata, so evaluation never looks at validation or test statistics.

    import mmjax.data, tensorflow_datasets as tfds
    builder = tfds.builder('synthetic_patients', data_dir=D)   # or 'synthetic_patients/tiny'
    builder.download_and_prepare()
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.data.local_info import LocalDatasetInfo, LocalPreparation
from mmjax.data.spec import DatasetSpec, length_histogram, std_with_floor
from mmjax.data.synthetic.ecg import LEADS
from mmjax.data.synthetic.generate import (
    DEFAULT_MISSING_RATES,
    MODALITIES,
    GenerationSettings,
    example_at,
    generate_split,
)
from mmjax.data.synthetic.labs import FEATURES
from mmjax.data.synthetic.latent import CONDITIONS
from mmjax.data.tokenizer import WordPieceTokenizer

TASKS = (
    TaskSpec("diagnosis", "multilabel", CONDITIONS),
    TaskSpec("severity", "regression"),
    TaskSpec("mortality", "binary"),
)


class SyntheticPatientsConfig(tfds.core.BuilderConfig):
    """Size, resolution and missingness of a `synthetic_patients` variant."""

    def __init__(self, *, num_train=4000, num_validation=500, num_test=1000, image_size=64, ecg_hz=100,
                 missing_rates=None, lab_missing_scale=1.0, seed=0, ecg_leads=1, note_visits=1, **kwargs):
        kwargs.setdefault("version", tfds.core.Version("1.1.0"))
        super().__init__(**kwargs)
        self.split_sizes = {"train": num_train, "validation": num_validation, "test": num_test}
        rates = dict(DEFAULT_MISSING_RATES if missing_rates is None else missing_rates)
        self.settings = GenerationSettings(
            image_size=image_size, ecg_hz=ecg_hz, missing_rates=tuple(sorted(rates.items())),
            lab_missing_scale=lab_missing_scale, seed=seed, ecg_leads=ecg_leads, note_visits=note_visits)


class SyntheticPatients(LocalPreparation, tfds.core.GeneratorBasedBuilder):
    """Simulated patients with image, note, labs/vitals and ECG; see the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    SOURCE = "a simulation of patients"
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Metadata as a DatasetSpec (modalities by name and kind, task statistics); "
                              "same examples as 1.0.0."}
    BUILDER_CONFIGS = [
        SyntheticPatientsConfig(name="default", description="4000/500/1000 patients, 64x64 images, "
                                "ECG 100 Hz, missing modalities 10-20%."),
        SyntheticPatientsConfig(name="complete", missing_rates={m: 0.0 for m in MODALITIES},
                                description="As default, but every modality is present."),
        SyntheticPatientsConfig(name="high_missing", missing_rates={m: 0.4 for m in MODALITIES},
                                lab_missing_scale=1.5, description="Each modality missing for 40%."),
        SyntheticPatientsConfig(name="large_images", image_size=224, ecg_hz=250,
                                description="As default with 224x224 images and a 250 Hz ECG."),
        # experiments/large.py: the sizes of a real study (a chest X-ray, a long note, a 12-lead 10 s ECG)
        SyntheticPatientsConfig(name="large", num_train=1024, num_validation=128, num_test=128, image_size=224,
                                ecg_hz=500, ecg_leads=12, note_visits=13,
                                description="1024/128/128 patients, 224x224 images, notes of ~500 tokens "
                                "(13 visits), a 12-lead 500 Hz ECG."),
        SyntheticPatientsConfig(name="tiny", num_train=256, num_validation=96, num_test=120, image_size=32,
                                description="A few hundred patients with 32x32 images, for tests."),
    ]

    def __init__(self, *, file_format=None, **kwargs):
        # array_record, not TFDS's tfrecord default: tfrecord needs TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.settings
        length = int(round(s.ecg_hz * s.ecg_seconds))
        f = tfds.features
        # Arrays are stored as raw bytes: decoding is then one np.frombuffer, 3x faster than TFDS's
        # default float/int lists (and zlib gains nothing on noisy images and signals).
        return LocalDatasetInfo(
            builder=self,
            description=__doc__,
            features=f.FeaturesDict({
                "patient_id": f.Scalar(dtype=np.int64),
                "age": f.Scalar(dtype=np.float32),
                "female": f.Scalar(dtype=np.bool_),
                "image": f.Tensor(shape=(s.image_size, s.image_size, 1), dtype=np.uint8, encoding="bytes"),
                "note": f.Text(),
                "labs": f.Tensor(shape=(len(FEATURES),), dtype=np.float32, encoding="bytes"),
                "ecg": f.Tensor(shape=(length,) if s.ecg_leads == 1 else (length, s.ecg_leads), dtype=np.float32,
                                encoding="bytes"),
                "present": {m: f.Scalar(dtype=np.bool_) for m in MODALITIES},
                "labels": {
                    "diagnosis": f.Tensor(shape=(len(CONDITIONS),), dtype=np.float32),
                    "severity": f.Scalar(dtype=np.float32),
                    "mortality": f.Scalar(dtype=np.float32),
                },
                "label_known": {"mortality": f.Scalar(dtype=np.bool_)},
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/mmjax/mmjax",
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        columns = {split: generate_split(cfg.settings, split, n)[0] for split, n in cfg.split_sizes.items()}
        self.info.metadata.update(fit_metadata(columns["train"], cfg))
        return {split: self._generate_examples(cols) for split, cols in columns.items()}

    def _generate_examples(self, columns):
        for i in range(len(columns["patient_id"])):
            yield int(columns["patient_id"][i]), example_at(columns, i)


def fit_metadata(train: dict, cfg: SyntheticPatientsConfig) -> dict:
    """The dataset's spec with preprocessing fitted on the training split only, plus the settings."""
    s = cfg.settings
    notes = [t for t in train["note"] if t]
    # No text_min_patients rule (the manifest's): simulated notes name no one, and applying it (one note per
    # patient here) would drop typos of 3-4 notes and change this version's vocabulary.
    tokenizer = WordPieceTokenizer.fit(notes)
    labs = train["labs"].astype(np.float64)
    log_scale = np.array([f.log_scale for f in FEATURES])
    lab_mean, lab_std = std_with_floor(np.where(log_scale, np.log(labs), labs))
    images = train["image"][train["present"]["image"]].astype(np.float64) / 255.0
    length = int(round(s.ecg_hz * s.ecg_seconds))
    modalities = (
        ModalitySpec("image", "image", shape=(s.image_size, s.image_size, 1), mean=(float(images.mean()),),
                     std=(float(images.std()),)),
        ModalitySpec("text", "text", field="note", vocab=tokenizer.vocab,
                     length_counts=length_histogram([len(tokenizer.tokenize(t)) for t in notes])),
        ModalitySpec("tabular", "tabular", field="labs", numeric=[f.name for f in FEATURES],
                     log_scale=log_scale.tolist(), mean=lab_mean.tolist(), std=lab_std.tolist()),
        ModalitySpec("signal", "signal", field="ecg", shape=(length, s.ecg_leads), rate=float(s.ecg_hz),
                     channel_names=("II",) if s.ecg_leads == 1 else LEADS),
    )
    known = train["mortality_known"]
    tasks = (
        dataclasses.replace(TASKS[0], class_counts=train["diagnosis"].sum(0).astype(int).tolist()),
        dataclasses.replace(TASKS[1], target_mean=float(train["severity"].mean()),
                            target_std=float(train["severity"].std())),
        dataclasses.replace(TASKS[2], class_counts=[int(train["mortality"][known].sum())]),
    )
    spec = DatasetSpec("synthetic_patients", modalities, tasks, dict(cfg.split_sizes))
    return {**spec.to_metadata(), "settings": dataclasses.asdict(s),
            "tabular_units": [f.unit for f in FEATURES]}
