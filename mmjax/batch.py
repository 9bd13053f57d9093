"""The batch contract: the only thing the input pipeline and the models share.

A batch is a nested dict of numpy (or jax) arrays with these keys and shapes. `B` is the batch
size; every other dimension is fixed for a dataset and config, so a jitted step compiles once.

```
batch = {
  'image':   {'values': f32[B, H, W, C],   # normalized pixels
              'present': bool[B]},         # False: the patient has no image
  'text':    {'values': i32[B, L],         # token ids, 0 is padding
              'mask': bool[B, L],          # True on real tokens
              'present': bool[B]},
  'tabular': {'values': f32[B, F],         # standardized; 0 where not observed
              'mask': bool[B, F],          # True where the value was measured
              'present': bool[B]},
  'signal':  {'values': f32[B, T, C],      # normalized waveform (or spectrogram frames)
              'mask': bool[B, T],          # True on real time steps
              'present': bool[B]},
  'labels':  {task: f32[B, ...]},          # one entry per task, see TaskSpec
  'label_mask': {task: bool[B, ...]},      # same shapes as labels; False: label unknown
  'example_mask': bool[B],                 # False on padding rows of an evaluation batch
  'patient_id': i64[B],
}
```

A modality that a dataset lacks is simply absent from the dict. When `present` is False the
values are zeros and every entry of `mask` is False; models must ignore them exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

MODALITIES = ("image", "text", "tabular", "signal")
SEQUENCE_MODALITIES = ("text", "tabular", "signal")  # those that carry a `mask`
TASK_KINDS = ("multilabel", "binary", "regression")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One prediction task: what the labels under `batch['labels'][name]` mean.

    multilabel: labels f32[B, K] in {0, 1}, one column per entry of `label_names`.
    binary: labels f32[B] in {0, 1}.
    regression: labels f32[B].
    """

    name: str
    kind: str
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; use one of {TASK_KINDS}")
        if self.kind == "multilabel" and not self.label_names:
            raise ValueError(f"task {self.name!r}: a multilabel task needs label_names")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names) if self.kind == "multilabel" else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TaskSpec:
        return cls(name=d["name"], kind=d["kind"], label_names=tuple(d.get("label_names", ())))


def modalities_in(batch: Mapping) -> tuple[str, ...]:
    """The modalities a batch carries, in canonical order."""
    return tuple(m for m in MODALITIES if m in batch)


def validate_batch(batch: Mapping, tasks: Sequence[TaskSpec]) -> None:
    """Raises ValueError naming the field when `batch` breaks the contract above."""
    if "example_mask" not in batch:
        raise ValueError("batch has no 'example_mask'")
    b = np.shape(batch["example_mask"])[0]

    def check(path: str, x, ndim: int, dtype_kind: str):
        if np.ndim(x) != ndim or np.shape(x)[0] != b:
            raise ValueError(f"batch field {path!r}: shape {np.shape(x)}, expected {ndim} dims with B={b}")
        if np.asarray(x).dtype.kind not in dtype_kind:
            raise ValueError(f"batch field {path!r}: dtype {np.asarray(x).dtype}, expected kind {dtype_kind}")

    ndims = {"image": 4, "text": 2, "tabular": 2, "signal": 3}
    kinds = {"image": "f", "text": "iu", "tabular": "f", "signal": "f"}
    for m in modalities_in(batch):
        check(f"{m}/values", batch[m]["values"], ndims[m], kinds[m])
        check(f"{m}/present", batch[m]["present"], 1, "b")
        if m in SEQUENCE_MODALITIES:
            check(f"{m}/mask", batch[m]["mask"], 2, "b")
    if not modalities_in(batch):
        raise ValueError(f"batch carries none of the modalities {MODALITIES}")
    for t in tasks:
        for key in ("labels", "label_mask"):
            if t.name not in batch.get(key, {}):
                raise ValueError(f"batch field {key}/{t.name!r} is missing")
        want = 2 if t.kind == "multilabel" else 1
        check(f"labels/{t.name}", batch["labels"][t.name], want, "f")
        check(f"label_mask/{t.name}", batch["label_mask"][t.name], want, "b")
