"""What a prepared dataset declares: its modalities (name -> kind, shapes, training statistics,
vocabulary, categories), its tasks and its split sizes. The pipeline and the model builder read
this, never a list of names.

Builders store `DatasetSpec.to_metadata()` in the dataset's TFDS metadata; a training run writes
it to `WORKDIR/dataset_spec.json`, so what inference needs travels with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.console import UserError

SPEC_FORMAT = 2  # metadata layout written by `to_metadata`
# Where TFDS datasets are prepared and read: $MMJAX_DATA_DIR, else TFDS's usual folder.
DEFAULT_DATA_DIR = os.environ.get("MMJAX_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


class DataError(UserError):
    """Bad input data; the message names the example (patient id, record or manifest row) and the field."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    modalities: tuple[ModalitySpec, ...]
    tasks: tuple[TaskSpec, ...]
    split_sizes: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        names = [m.name for m in self.modalities]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"dataset {self.name!r}: modality names {dup} appear twice")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"dataset {self.name!r} has no modality {name!r}; it has {list(self.modality_names)}")

    def select_modalities(self, names: Sequence[str] | None) -> tuple[ModalitySpec, ...]:
        """The named modalities in the given order; empty or None: all of them."""
        if not names:
            return self.modalities
        unknown = [n for n in names if n not in self.modality_names]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; dataset {self.name!r} has {list(self.modality_names)}")
        return tuple(self.modality(n) for n in names)

    def select_tasks(self, names: Sequence[str] | None) -> tuple[TaskSpec, ...]:
        if not names:
            return self.tasks
        known = {t.name: t for t in self.tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; dataset {self.name!r} has {sorted(known)}")
        return tuple(known[n] for n in names)

    def to_metadata(self) -> dict:
        return {"format": SPEC_FORMAT, "name": self.name, "split_sizes": dict(self.split_sizes),
                "modalities": [m.to_dict() for m in self.modalities], "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_metadata(cls, md: dict) -> DatasetSpec:
        return cls(name=md["name"], modalities=tuple(ModalitySpec.from_dict(m) for m in md["modalities"]),
                   tasks=tuple(TaskSpec.from_dict(t) for t in md["tasks"]), split_sizes=dict(md["split_sizes"]))

    @classmethod
    def from_builder(cls, builder) -> DatasetSpec:
        md = builder.info.metadata
        if not md or md.get("format") != SPEC_FORMAT:
            raise DataError(f"{builder.data_dir}: the dataset's metadata (modalities, statistics, tasks) is "
                            f"missing or of an older layout; prepare it again (download_and_prepare)")
        spec = cls.from_metadata(dict(md))
        sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
        return dataclasses.replace(spec, split_sizes=sizes or spec.split_sizes)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_metadata(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> DatasetSpec:
        with open(path) as f:
            return cls.from_metadata(json.load(f))


def std_with_floor(values: np.ndarray, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) over finite values with a floor relative to the scale, so a near-constant column
    is not blown up by a tiny std: std >= 1e-3 * max(|mean|, 1). A degenerate column (a single
    distinct value, or none, in training) gets std = max(|mean|, 1): a flag that was always 0 in
    training then maps a later 1 to 1, not to 1000."""
    values = np.asarray(values, np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        mean = np.nan_to_num(np.nanmean(values, axis=axis))
        std = np.nan_to_num(np.nanstd(values, axis=axis))
        spread = np.nan_to_num(np.nanmax(values, axis=axis) - np.nanmin(values, axis=axis))
    scale = np.maximum(np.abs(mean), 1.0)
    return mean, np.where(spread > 0, np.maximum(std, 1e-3 * scale), scale)


def length_histogram(lengths: Sequence[int]) -> list[int]:
    """`counts[n]`: how many texts have n tokens (stored in a text modality's spec)."""
    return np.bincount(np.asarray(lengths, np.int64), minlength=1).tolist() if len(lengths) else [0]


def truncation(spec: ModalitySpec, max_length: int) -> dict:
    """How many training texts of a text modality are longer than `max_length` and by how much."""
    counts = np.asarray(spec.length_counts, np.int64)
    n = np.arange(len(counts))
    over = n > max_length
    total = int(counts.sum())
    cut = int(counts[over].sum())
    return {"texts": total, "truncated": cut, "fraction": cut / total if total else 0.0,
            "max_tokens": int(n[counts > 0].max()) if total else 0,
            "tokens_lost_mean": float(((n - max_length) * counts)[over].sum() / cut) if cut else 0.0}
