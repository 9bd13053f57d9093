"""The batch contract: the only thing the input pipeline and the models share.

A dataset declares its modalities by name, each of one kind (`image`, `text`, `tabular`,
`signal`), and its tasks (`ModalitySpec`, `TaskSpec`, below). A batch is a nested dict of numpy
(or jax) arrays keyed by those names; each entry carries its kind's fields. `B` is the batch
size; every other dimension is fixed for a dataset and config, so a jitted step compiles once.

```
batch = {
  <image modality>:   {'values': f32[B, H, W, C],   # normalized pixels
                       'present': bool[B]},         # False: the patient has no such image
  <text modality>:    {'values': i32[B, L],         # token ids, 0 is padding
                       'mask': bool[B, L],          # True on real tokens
                       'present': bool[B]},
  <tabular modality>: {'values': f32[B, F],         # numeric columns, standardized; 0 where not observed
                       'mask': bool[B, F],          # True where the value was measured
                       'categories': i32[B, G],     # categorical columns: 0 missing, 1 unseen in training,
                                                    #   2 + k the k-th training category
                       'present': bool[B]},
  <signal modality>:  {'values': f32[B, T, C],      # normalized waveform (or spectrogram frames)
                       'mask': bool[B, T],          # True on real time steps
                       'present': bool[B]},         # (evaluation with W windows: [B, W, T, C], [B, W, T])
  'labels':  {task: [B, ...]},           # one entry per task, see TaskSpec
  'label_mask': {task: bool[B, ...]},    # same shapes as labels; False: label unknown
  'example_mask': bool[B],               # False on padding rows of an evaluation batch
  'patient_id': str[B],                  # host only (never sent to devices)
}
```

When `present` is False the values are zeros and every entry of `mask` is False; models must
ignore them exactly. Names such as `frontal`, `lateral`, `report`, `ecg` are the dataset's
choice; nothing outside a dataset's own builder assumes particular names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("image", "text", "tabular", "signal")
SEQUENCE_KINDS = ("text", "tabular", "signal")  # those that carry a `mask`
TASK_KINDS = ("multilabel", "binary", "multiclass", "regression")
_NDIM = {"image": 4, "text": 2, "tabular": 2, "signal": 3}
_DTYPE = {"image": "f", "text": "iu", "tabular": "f", "signal": "f"}
RESERVED = ("labels", "label_mask", "example_mask", "patient_id")  # batch keys that are not modalities


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """One modality of a dataset: its name, kind, where the raw example stores it, and what the
    pipeline and the model need to know about it (fitted on the training split).

    - image: `shape` (H, W, C) stored as uint8; `mean`, `std` per channel of pixels in [0, 1].
    - text: `vocab` (WordPiece pieces); `length_counts[n]` training texts of n tokens.
    - tabular: `numeric` column names with `mean`, `std` (after log where `log_scale`);
      `categorical` column names with their training `categories`.
    - signal: `shape` (T, C) after cropping or padding to the schema's length; `rate` in Hz;
      `channel_names`.
    `field` is the raw example's key (a '/'-separated path); default: the name.
    """

    name: str
    kind: str
    field: str = ""
    shape: tuple = ()
    mean: tuple = ()
    std: tuple = ()
    vocab: tuple = ()
    length_counts: tuple = ()
    numeric: tuple = ()
    log_scale: tuple = ()
    categorical: tuple = ()
    categories: tuple = ()
    rate: float = 0.0
    channel_names: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: unknown kind {self.kind!r}; use one of {KINDS}")
        if self.name in RESERVED:
            raise ValueError(f"modality name {self.name!r} is reserved for {RESERVED}")
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        if not self.field:
            object.__setattr__(self, "field", self.name)
        if self.kind == "tabular" and not (self.numeric or self.categorical):
            raise ValueError(f"tabular modality {self.name!r} has no numeric and no categorical columns")
        if self.kind == "tabular" and len(self.categories) != len(self.categorical):
            raise ValueError(f"tabular modality {self.name!r}: {len(self.categorical)} categorical columns "
                             f"but {len(self.categories)} category lists")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def category_sizes(self) -> tuple[int, ...]:
        """Embedding rows per categorical column: missing, unseen, then the training categories."""
        return tuple(2 + len(c) for c in self.categories)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModalitySpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"modality {d.get('name')!r}: unknown spec field(s) {unknown}")
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One prediction task: what the labels under `batch['labels'][name]` mean.

    multilabel: labels f32[B, K] in {0, 1}, one column per entry of `label_names`.
    binary: labels f32[B] in {0, 1}.
    multiclass: labels i32[B], the index into `label_names` (the classes).
    regression: labels f32[B] in the dataset's units; the model predicts
        `target_mean + target_std * z` and the loss is the squared error of z, so a target is
        standardized with training-split statistics without the data changing.
    `class_counts`: training-split counts (positives per label; examples per class).
    """

    name: str
    kind: str
    label_names: tuple[str, ...] = ()
    class_counts: tuple[int, ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "class_counts", tuple(int(c) for c in self.class_counts))
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; use one of {TASK_KINDS}")
        if self.kind == "multilabel" and not self.label_names:
            raise ValueError(f"task {self.name!r}: a multilabel task needs label_names")
        if self.kind == "multiclass" and len(self.label_names) < 2:
            raise ValueError(f"task {self.name!r}: a multiclass task needs at least 2 classes, "
                             f"got {list(self.label_names)}")
        if not self.target_std > 0:
            raise ValueError(f"task {self.name!r}: target_std={self.target_std} must be > 0")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names) if self.kind in ("multilabel", "multiclass") else 1

    @property
    def label_ndim(self) -> int:
        """Dimensions of the task's labels in a batch, the batch axis included."""
        return 2 if self.kind == "multilabel" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TaskSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def modalities_in(batch: Mapping) -> tuple[str, ...]:
    """The modality names a batch carries, in its order."""
    return tuple(k for k in batch if k not in RESERVED)


def validate_batch(batch: Mapping, tasks: Sequence[TaskSpec], modalities: Sequence[ModalitySpec] = ()) -> None:
    """Raises ValueError naming the field when `batch` breaks the contract above.

    With `modalities`, checks each named entry against its kind; without, infers the kind from
    the entry's fields (a `categories` entry: tabular; else from the number of dimensions).
    """
    if "example_mask" not in batch:
        raise ValueError("batch has no 'example_mask'")
    b = np.shape(batch["example_mask"])[0]

    def check(path: str, x, ndim: int, dtype_kind: str):
        if np.ndim(x) != ndim or np.shape(x)[0] != b:
            raise ValueError(f"batch field {path!r}: shape {np.shape(x)}, expected {ndim} dims with B={b}")
        if np.asarray(x).dtype.kind not in dtype_kind:
            raise ValueError(f"batch field {path!r}: dtype {np.asarray(x).dtype}, expected kind {dtype_kind}")

    kinds = {m.name: m.kind for m in modalities}
    names = tuple(kinds) or modalities_in(batch)
    if not names:
        raise ValueError("batch carries no modality")
    for m in names:
        if m not in batch:
            raise ValueError(f"batch has no modality {m!r}; it has {list(modalities_in(batch))}")
        entry = batch[m]
        kind = kinds.get(m) or _infer_kind(entry)
        windowed = int(kind == "signal" and np.ndim(entry["values"]) == 4)  # evaluation windows
        check(f"{m}/values", entry["values"], _NDIM[kind] + windowed, _DTYPE[kind])
        check(f"{m}/present", entry["present"], 1, "b")
        if kind in SEQUENCE_KINDS:
            check(f"{m}/mask", entry["mask"], 2 + windowed, "b")
        if kind == "tabular":
            check(f"{m}/categories", entry["categories"], 2, "iu")
    for t in tasks:
        for key in ("labels", "label_mask"):
            if t.name not in batch.get(key, {}):
                raise ValueError(f"batch field {key}/{t.name!r} is missing")
        check(f"labels/{t.name}", batch["labels"][t.name], t.label_ndim, "iu" if t.kind == "multiclass" else "f")
        check(f"label_mask/{t.name}", batch["label_mask"][t.name], t.label_ndim, "b")


def _infer_kind(entry: Mapping) -> str:
    if "categories" in entry:
        return "tabular"
    ndim = np.ndim(entry["values"])
    if ndim == 4:
        return "image"
    if ndim == 3:
        return "signal"
    return "text" if np.asarray(entry["values"]).dtype.kind in "iu" else "tabular"


def fake_batch(modalities: Sequence[ModalitySpec], tasks: Sequence[TaskSpec], batch_size: int, *,
               text_length: int = 16, seed: int = 0) -> dict:
    """A random batch that follows the contract for these specs (model tests, benchmarks, shape
    inference): every modality present, every label known."""
    rng = np.random.default_rng(seed)
    b = batch_size
    out = {}
    for m in modalities:
        if m.kind == "image":
            entry = {"values": rng.standard_normal((b, *m.shape)).astype(np.float32)}
        elif m.kind == "text":
            ids = rng.integers(2, max(m.vocab_size, 3), (b, text_length)).astype(np.int32)
            entry = {"values": ids, "mask": np.ones((b, text_length), bool)}
        elif m.kind == "tabular":
            f = len(m.numeric)
            cats = [rng.integers(0, n, b) for n in m.category_sizes]
            entry = {"values": rng.standard_normal((b, f)).astype(np.float32), "mask": np.ones((b, f), bool),
                     "categories": np.stack(cats, 1).astype(np.int32) if cats else np.zeros((b, 0), np.int32)}
        else:
            entry = {"values": rng.standard_normal((b, *m.shape)).astype(np.float32),
                     "mask": np.ones((b, m.shape[0]), bool)}
        out[m.name] = {**entry, "present": np.ones(b, bool)}
    labels, masks = {}, {}
    for t in tasks:
        if t.kind == "multiclass":
            labels[t.name] = rng.integers(0, t.num_outputs, b).astype(np.int32)
        elif t.kind == "regression":
            labels[t.name] = (t.target_mean + t.target_std * rng.standard_normal(b)).astype(np.float32)
        else:
            shape = (b, t.num_outputs) if t.kind == "multilabel" else (b,)
            labels[t.name] = (rng.random(shape) < 0.3).astype(np.float32)
        masks[t.name] = np.ones(labels[t.name].shape, bool)
    out.update(labels=labels, label_mask=masks, example_mask=np.ones(b, bool),
               patient_id=np.array([f"p{i}" for i in range(b)]))
    return out
