"""Per-modality preprocessing as small Grain transforms, each told which modality it serves.

Per example (before batching): `CheckExample` (bad input fails loudly, naming the patient and
the field), `SelectImage`, `TokenizeText`, `StandardizeTabular`, `PrepareSignal` (crop or pad to
the spec's length, normalize), `Spectrogram` (optional), `CollectLabels`, `Assemble`. Per batch
(after batching, vectorized): `ImageToFloat` (evaluation, and training without augmentation) or
`AugmentImages` (training: the random crop, flip, small rotation and intensity jitter, standardizing
the uint8 images as it samples them).

Each per-example op reads the raw field named by its `ModalitySpec` (`spec.field`, a
'/'-separated path into the example) and writes `out/<name>`, one entry of the batch contract
(`mmjax/batch.py`); `Assemble` then keeps only what the contract names. So one op serves any
modality name (big_vision's `key=` / `key_result=`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.data.spec import DataError
from mmjax.data.tokenizer import WordPieceTokenizer

__all__ = ["DataError", "CheckExample", "SelectImage", "ImageToFloat", "TokenizeText", "StandardizeTabular",
           "PrepareSignal", "Spectrogram", "CollectLabels", "Assemble", "AugmentImages", "get_field",
           "tabular_parts"]


def get_field(ex, path: str):
    """`ex['a']['b']` for path 'a/b' (TFDS examples are nested dicts)."""
    for key in path.split("/"):
        ex = ex[key]
    return ex


def _pid(ex) -> str:
    if "patient_id" not in ex:
        return "example"
    pid = ex["patient_id"]
    pid = pid.decode("utf-8") if isinstance(pid, bytes) else pid
    return f"patient_id={pid}"


def _present(ex, name: str) -> bool:
    return bool(ex["present"][name])


def tabular_parts(ex, spec: ModalitySpec):
    """(numeric f32[F], categorical i32[G]) of a tabular field: an array (numeric only) or a dict."""
    value = get_field(ex, spec.field)
    if isinstance(value, dict):
        numeric = value.get("numeric", np.zeros(0, np.float32))
        categorical = value.get("categorical", np.zeros(0, np.int32))
    else:
        numeric, categorical = value, np.zeros(0, np.int32)
    return np.asarray(numeric, np.float32), np.asarray(categorical, np.int32)


def label_and_known(ex, t: TaskSpec):
    """(label array, known bool of the same shape) of task t in a raw example; a missing label is an error."""
    if t.name not in ex["labels"]:
        raise DataError(f"{_pid(ex)}: unknown label {t.name!r}; the example has {sorted(ex['labels'])}")
    y = np.asarray(ex["labels"][t.name])
    known = np.broadcast_to(np.asarray(ex.get("label_known", {}).get(t.name, True), bool), y.shape).copy()
    return y, known


@dataclasses.dataclass
class CheckExample(grain.transforms.Map):
    """Fails on wrong shapes, NaN or infinities where none are allowed, and labels out of range."""

    modalities: Sequence[ModalitySpec]
    tasks: Sequence[TaskSpec]

    def map(self, ex):
        where = _pid(ex)
        for m in self.modalities:
            if m.kind == "image":
                x = get_field(ex, m.field)
                if np.shape(x) != tuple(m.shape):
                    raise DataError(f"{where}: field {m.field!r} has shape {np.shape(x)}, expected {m.shape}")
            elif m.kind == "signal":
                x = np.asarray(get_field(ex, m.field))
                channels = m.shape[1]
                if not (x.ndim == 1 and channels == 1 or x.ndim == 2 and x.shape[1] == channels):
                    raise DataError(f"{where}: field {m.field!r} has shape {x.shape}, expected [time, {channels}]")
                if not np.all(np.isfinite(x)):
                    raise DataError(f"{where}: field {m.field!r} contains NaN or infinity")
            elif m.kind == "tabular":
                numeric, categorical = tabular_parts(ex, m)
                if numeric.shape != (len(m.numeric),) or categorical.shape != (len(m.categorical),):
                    raise DataError(f"{where}: field {m.field!r} has {numeric.shape[0]} numeric and "
                                    f"{categorical.shape[0]} categorical values, expected {len(m.numeric)} "
                                    f"and {len(m.categorical)}")
                if np.any(np.isinf(numeric)):  # NaN is allowed there: it means 'not measured'
                    raise DataError(f"{where}: field {m.field!r} contains infinity")
                if np.any((categorical < 0) | (categorical >= np.asarray(m.category_sizes, np.int64))):
                    raise DataError(f"{where}: field {m.field!r} has a category index out of range: {categorical}")
        for t in self.tasks:
            v, known = label_and_known(ex, t)
            v = v[known]
            if not np.all(np.isfinite(v)):
                raise DataError(f"{where}: label {t.name!r} is not finite: {v}")
            if t.kind in ("binary", "multilabel") and not np.all((v == 0) | (v == 1)):
                raise DataError(f"{where}: label {t.name!r} must be 0 or 1, got {v}")
            if t.kind == "multiclass" and not np.all((v >= 0) & (v < t.num_outputs) & (v == np.round(v))):
                raise DataError(f"{where}: label {t.name!r} must be a class index in [0, {t.num_outputs}), got {v}")
        return ex


@dataclasses.dataclass
class SelectImage(grain.transforms.Map):
    """Passes the uint8 image on (zeroed when absent); `ImageToFloat` converts whole batches."""

    spec: ModalitySpec

    def map(self, ex):
        image = get_field(ex, self.spec.field)
        present = _present(ex, self.spec.name)
        ex[f"out/{self.spec.name}"] = {"values": image if present else np.zeros_like(image),
                                       "present": np.bool_(present)}
        return ex


@dataclasses.dataclass
class ImageToFloat(grain.transforms.Map):
    """Batch of uint8 [B, H, W, C] -> f32 standardized per channel with the training split's mean and std."""

    specs: Sequence[ModalitySpec]

    def map(self, batch):
        for spec in self.specs:
            entry = batch[spec.name]
            std = np.asarray(spec.std, np.float32)
            pixels = entry["values"].astype(np.float32)
            pixels *= 1.0 / (255.0 * std)
            pixels -= np.asarray(spec.mean, np.float32) / std
            pixels *= entry["present"][:, None, None, None]
            batch[spec.name] = {"values": pixels, "present": entry["present"]}
        return batch


@dataclasses.dataclass
class TokenizeText(grain.transforms.Map):
    spec: ModalitySpec
    tokenizer: WordPieceTokenizer
    max_length: int

    def map(self, ex):
        present = _present(ex, self.spec.name)
        text = get_field(ex, self.spec.field)
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        ids, mask, _ = self.tokenizer.encode(text if present else "", self.max_length)
        ex[f"out/{self.spec.name}"] = {"values": ids, "mask": mask, "present": np.bool_(present and mask.any())}
        return ex


@dataclasses.dataclass
class StandardizeTabular(grain.transforms.Map):
    """Numeric columns: (log where the spec says) then (x - mean) / std with training-split statistics;
    NaN -> 0 with mask False, so a missing value is never confused with an average one. A log-scaled
    value <= 0 is an error. Categorical columns pass as indices (0 missing, 1 unseen in training)."""

    spec: ModalitySpec

    def __post_init__(self):
        self._log = np.asarray(self.spec.log_scale or [False] * len(self.spec.numeric), bool)
        self._mean = np.asarray(self.spec.mean, np.float32)
        self._std = np.asarray(self.spec.std, np.float32)

    def map(self, ex):
        numeric, categorical = tabular_parts(ex, self.spec)
        present = _present(ex, self.spec.name)
        bad = self._log & (numeric <= 0)
        if present and bad.any():
            cols = [c for c, b in zip(self.spec.numeric, bad) if b]
            raise DataError(f"{_pid(ex)}: {self.spec.name} column(s) {cols} are log-scaled but <= 0: "
                            f"{numeric[bad].tolist()}")
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(self._log, np.log(numeric), numeric)
        observed = np.isfinite(x) & present
        values = np.where(observed, (x - self._mean) / self._std, 0.0).astype(np.float32)
        categories = np.where(present, categorical, 0).astype(np.int32)
        ex[f"out/{self.spec.name}"] = {"values": values, "mask": observed, "categories": categories,
                                       "present": np.bool_(present and (observed.any() or categories.any()))}
        return ex


@dataclasses.dataclass
class PrepareSignal(grain.transforms.RandomMap):
    """[T] or [T, C] -> [length, C]: a longer recording is cropped (a random window in training, the
    centre otherwise), a shorter one zero-padded with the time mask False on the padding; then each
    channel is standardized over its real samples.

    With `windows` = W > 0 (evaluation), W evenly spaced windows covering the recording instead:
    values [W, length, C], mask [W, length]; the eval step averages the predictions over them.
    """

    spec: ModalitySpec
    random_crop: bool = False
    windows: int = 0

    def random_map(self, ex, rng: np.random.Generator):
        length, channels = self.spec.shape
        present = _present(ex, self.spec.name)
        x = np.asarray(get_field(ex, self.spec.field), np.float32).reshape(-1, channels)
        if not present:
            x = x[:0]
        n = x.shape[0]
        if self.windows:
            starts = np.round(np.linspace(0, max(n - length, 0), self.windows)).astype(int)
        elif n > length:
            starts = [int(rng.integers(0, n - length + 1)) if self.random_crop else (n - length) // 2]
        else:
            starts = [0]
        crops = [_standardized_window(x, s, length) for s in starts]
        values, mask = np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])
        if not self.windows:
            values, mask = values[0], mask[0]
        ex[f"out/{self.spec.name}"] = {"values": values, "mask": mask, "present": np.bool_(mask.any())}
        return ex


def _standardized_window(x, start: int, length: int):
    """x[start:start + length] standardized per channel, zero-padded to `length`; (values, time mask)."""
    w = x[start:start + length]
    out = np.zeros((length, x.shape[1]), np.float32)
    mask = np.zeros(length, bool)
    if len(w):
        w = w - w.mean(axis=0)
        w *= 1.0 / (np.sqrt((w * w).mean(axis=0)) + 1e-6)
        out[:len(w)], mask[:len(w)] = w, True
    return out, mask


def spectrogram_frames(length: int, frame_length: int = 64, hop: int = 16) -> int:
    return max(1 + (length - frame_length) // hop, 0)


@dataclasses.dataclass
class Spectrogram(grain.transforms.Map):
    """Optional front end: log-magnitude STFT of each normalized channel. [T, C] -> [frames, bins * C];
    a frame is real when all its samples are."""

    name: str
    frame_length: int = 64
    hop: int = 16

    def map(self, ex):
        sig = ex[f"out/{self.name}"]
        x, time_mask = sig["values"], sig["mask"]  # [(W,) T, C], [(W,) T]
        n_frames = spectrogram_frames(x.shape[-2], self.frame_length, self.hop)
        idx = np.arange(self.frame_length)[None, :] + self.hop * np.arange(n_frames)[:, None]  # [F, L]
        window = np.hanning(self.frame_length).astype(np.float32)[None, :, None]
        frames = x[..., idx, :] * window  # [(W,) F, L, C]
        spec = np.log1p(np.abs(np.fft.rfft(frames, axis=-2))).astype(np.float32)  # [(W,) F, bins, C]
        mask = time_mask[..., idx].all(axis=-1)
        values = spec.reshape(*spec.shape[:-2], -1) * mask[..., None]
        ex[f"out/{self.name}"] = {"values": values, "mask": mask, "present": np.bool_(mask.any())}
        return ex


@dataclasses.dataclass
class CollectLabels(grain.transforms.Map):
    tasks: Sequence[TaskSpec]

    def map(self, ex):
        labels, masks = {}, {}
        for t in self.tasks:
            y, known = label_and_known(ex, t)
            y = y.astype(np.int32 if t.kind == "multiclass" else np.float32)
            labels[t.name] = np.where(known, y, 0).astype(y.dtype)
            masks[t.name] = known
        ex["out/labels"], ex["out/label_mask"] = labels, masks
        return ex


@dataclasses.dataclass
class Assemble(grain.transforms.Map):
    """Keeps exactly the fields of the batch contract for the chosen modalities."""

    names: Sequence[str]

    def map(self, ex):
        out = {m: ex[f"out/{m}"] for m in self.names}
        out["labels"], out["label_mask"] = ex["out/labels"], ex["out/label_mask"]
        out["example_mask"] = np.bool_(True)
        pid = ex["patient_id"]
        out["patient_id"] = np.str_(pid.decode("utf-8") if isinstance(pid, bytes) else pid)
        return out


@dataclasses.dataclass
class AugmentImages(grain.transforms.RandomMap):
    """Train-time image augmentation of a whole batch in one bilinear warp, compiled by XLA.

    Per image: random crop (as a zoom in [1, max_zoom] around a shifted centre), horizontal flip,
    rotation up to `max_degrees`, brightness and contrast jitter. Absent images stay zero.

    With `specs`, the batch's images are uint8 (`SelectImage`) and the warp standardizes them with
    each spec's mean and std as it samples (in place of `ImageToFloat`: uint8 until the last moment);
    without, they are float already. The random draws are NumPy's, made per batch; the warp, four
    gathers and the blend for every pixel of the batch, runs as one XLA program on the host's CPU
    (`_warp`): ~5x the examples/s of the same arithmetic in NumPy at 224x224x3, and the same values
    to float rounding (tests/test_pipeline.py checks it against scipy.ndimage).
    """

    max_zoom: float = 1.12
    max_shift: float = 0.06
    max_degrees: float = 8.0
    flip_probability: float = 0.5
    intensity: float = 0.1
    names: Sequence[str] = ("image",)  # the image modalities to augment (float input)
    specs: Sequence[ModalitySpec] = ()  # or: the image modalities, uint8 input standardized by their specs
    # (offset, rows): the batch is rows [offset, offset + B) of a global batch of `rows` rows (one
    # process's part): the draws are made for every row and this part's kept, so that a global batch
    # is augmented alike on any number of processes. (): the batch is the whole global batch.
    rows: tuple = ()

    def random_map(self, batch, rng: np.random.Generator):
        if self.specs:
            for spec in self.specs:
                std = np.asarray(spec.std, np.float32)
                batch[spec.name] = self._augment(batch[spec.name], rng, 1.0 / (255.0 * std),
                                                 -np.asarray(spec.mean, np.float32) / std)
        else:
            for name in self.names:
                batch[name] = self._augment(batch[name], rng, np.float32(1), np.float32(0))
        return batch

    def _augment(self, entry, rng: np.random.Generator, scale, offset):
        x = entry["values"]  # [B, H, W, C]
        b, h, w, c = x.shape
        f32 = np.float32
        n0, n = self.rows or (0, b)
        mine = slice(n0, n0 + b)  # this batch's rows of the draws
        zoom = rng.uniform(1.0, self.max_zoom, n)[mine].astype(f32)
        theta = np.deg2rad(rng.uniform(-self.max_degrees, self.max_degrees, n)[mine]).astype(f32)
        flip = np.where(rng.random(n)[mine] < self.flip_probability, -1.0, 1.0).astype(f32)
        shift = rng.uniform(-self.max_shift, self.max_shift, (2, n))[:, mine].astype(f32)
        gain = (1.0 + rng.uniform(-self.intensity, self.intensity, n)[mine]).astype(f32)
        bias = rng.uniform(-self.intensity, self.intensity, n)[mine].astype(f32)
        # Source pixel coordinates as an affine map of output pixel indices (i, j):
        # x_src = ax * j + bx * i + cx, y_src = ay * j + by * i + cy; with gx = j / sx - 1 and gy = i / sy - 1,
        # x_src (pixels) = sx * (flip * (cos * gx - sin * gy) + shift_x + 1), y_src likewise.
        cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
        sy, sx = (h - 1) / 2, (w - 1) / 2
        affine = np.stack([flip * cos, -flip * sin * sx / sy, sx * (flip * (-cos + sin) + shift[0] + 1),
                           sin * sy / sx, cos, sy * (-sin - cos + shift[1] + 1)], axis=1).astype(f32)  # [B, 6]
        channel = np.stack([np.broadcast_to(np.asarray(v, f32), (c,)) for v in (scale, offset)])
        out = _warp(x, affine, channel, np.stack([gain, bias], axis=1), entry["present"])
        return {"values": out, "present": entry["present"]}


def _warp(x, affine, channel, intensity, present):
    """The augmentation's arithmetic on the host's CPU through XLA: x [B, H, W, C] (uint8 or f32)
    sampled bilinearly (edges clamped) at the affine map [B, 6] of the output pixel indices,
    standardized per channel (channel [2, C]: scale, offset), then `* gain + bias` (intensity [B, 2]),
    zero where `present` [B] is False. One compilation per batch shape and dtype."""
    import jax

    cpu = jax.local_devices(backend="cpu")[0]  # this process's (jax.devices lists every process's)
    args = jax.device_put((x, affine, channel, intensity, present), cpu)
    return np.asarray(_warp_jit()(*args))


@functools.cache
def _warp_jit():
    import jax
    import jax.numpy as jnp

    def warp(x, affine, channel, intensity, present):
        b, h, w, _ = x.shape
        col = lambda k: affine[:, k, None, None]
        i = jnp.arange(h, dtype=jnp.float32)[None, :, None]
        j = jnp.arange(w, dtype=jnp.float32)[None, None, :]
        xx = jnp.clip(col(0) * j + (col(1) * i + col(2)), 0.0, w - 1.0)  # [B, H, W]
        yy = jnp.clip(col(3) * j + (col(4) * i + col(5)), 0.0, h - 1.0)
        x0 = jnp.minimum(xx.astype(jnp.int32), w - 2)
        y0 = jnp.minimum(yy.astype(jnp.int32), h - 2)
        fx, fy = (xx - x0)[..., None], (yy - y0)[..., None]
        rows = jnp.arange(b)[:, None, None]
        pixel = lambda dy, dx: x[rows, y0 + dy, x0 + dx].astype(jnp.float32) * channel[0] + channel[1]
        top = pixel(0, 0)
        top = top + (pixel(0, 1) - top) * fx
        bottom = pixel(1, 0)
        bottom = bottom + (pixel(1, 1) - bottom) * fx
        out = top + (bottom - top) * fy
        out = out * intensity[:, 0, None, None, None] + intensity[:, 1, None, None, None]
        return jnp.where(present[:, None, None, None], out, 0.0).astype(jnp.float32)

    return jax.jit(warp)
