"""Per-modality preprocessing as small Grain transforms.

Per example (before batching): `CheckExample` (bad input fails loudly, naming the patient and
the field), `ImageToFloat`, `TokenizeText`, `StandardizeTabular`, `NormalizeSignal`,
`Spectrogram` (optional), `CollectLabels`. Per batch (after batching, vectorized): `AugmentImages`,
the train-time random crop, flip, small rotation and intensity jitter.

Each per-example transform reads raw fields of a TFDS example and writes one entry of the
batch contract (`mmjax/batch.py`); `Assemble` then keeps only what the contract names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from mmjax.batch import TaskSpec
from mmjax.data.tokenizer import WordPieceTokenizer


class DataError(ValueError):
    """Bad input data; the message names the example (patient id or record) and the field."""


def _pid(ex) -> str:
    return f"patient_id={int(ex['patient_id'])}" if "patient_id" in ex else "example"


@dataclasses.dataclass
class CheckExample(grain.transforms.Map):
    """Fails on wrong shapes, NaN or infinities where none are allowed, and out-of-range labels."""

    image_shape: tuple[int, ...]
    signal_length: int
    num_labs: int

    def map(self, ex):
        where = _pid(ex)
        for field, shape in (("image", self.image_shape), ("ecg", (self.signal_length,)),
                             ("labs", (self.num_labs,))):
            if np.shape(ex[field]) != tuple(shape):
                raise DataError(f"{where}: field {field!r} has shape {np.shape(ex[field])}, expected {shape}")
        if not np.all(np.isfinite(ex["ecg"])):
            raise DataError(f"{where}: field 'ecg' contains NaN or infinity")
        if np.any(np.isinf(ex["labs"])):  # NaN is allowed there: it means 'not measured'
            raise DataError(f"{where}: field 'labs' contains infinity")
        for name, value in ex["labels"].items():
            v = np.asarray(value)
            if not np.all(np.isfinite(v)):
                raise DataError(f"{where}: label {name!r} is not finite: {v}")
        return ex


class SelectImage(grain.transforms.Map):
    """Passes the uint8 image on (zeroed when absent); `ImageToFloat` converts whole batches."""

    def map(self, ex):
        present = bool(ex["present"]["image"])
        ex["out/image"] = {"values": ex["image"] if present else np.zeros_like(ex["image"]),
                           "present": np.bool_(present)}
        return ex


@dataclasses.dataclass
class ImageToFloat(grain.transforms.Map):
    """Batch of uint8 [B, H, W, C] -> f32 standardized with the training split's mean and std."""

    mean: float
    std: float

    def map(self, batch):
        if "image" not in batch:
            return batch
        scale = np.float32(1.0 / (255.0 * self.std))
        pixels = batch["image"]["values"].astype(np.float32)
        pixels *= scale
        pixels -= np.float32(self.mean / self.std)
        pixels *= batch["image"]["present"][:, None, None, None]
        batch["image"] = {"values": pixels, "present": batch["image"]["present"]}
        return batch


@dataclasses.dataclass
class TokenizeText(grain.transforms.Map):
    tokenizer: WordPieceTokenizer
    max_length: int

    def map(self, ex):
        present = bool(ex["present"]["text"])
        note = ex["note"].decode("utf-8") if isinstance(ex["note"], bytes) else str(ex["note"])
        ids, mask, _ = self.tokenizer.encode(note if present else "", self.max_length)
        ex["out/text"] = {"values": ids, "mask": mask, "present": np.bool_(present and mask.any())}
        return ex


@dataclasses.dataclass
class StandardizeTabular(grain.transforms.Map):
    """(log for skewed features) then (x - mean) / std with training-split statistics; NaN -> 0
    with mask False, so a missing value is never confused with an average one."""

    mean: np.ndarray
    std: np.ndarray
    log_scale: np.ndarray

    def map(self, ex):
        labs = np.asarray(ex["labs"], np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(self.log_scale, np.log(labs), labs)
        observed = np.isfinite(x) & bool(ex["present"]["tabular"])
        values = np.where(observed, (x - self.mean) / self.std, 0.0).astype(np.float32)
        ex["out/tabular"] = {"values": values, "mask": observed, "present": np.bool_(observed.any())}
        return ex


@dataclasses.dataclass
class NormalizeSignal(grain.transforms.Map):
    """Per recording: subtract the mean, divide by the standard deviation. [T] -> [T, 1]."""

    def map(self, ex):
        present = bool(ex["present"]["signal"])
        x = np.asarray(ex["ecg"], np.float32)
        if present:
            x = x - x.sum() / x.size
            x *= 1.0 / (np.sqrt(np.dot(x, x) / x.size) + 1e-6)
        else:
            x = np.zeros_like(x)
        ex["out/signal"] = {"values": x[:, None], "mask": np.full(x.shape[0], present), "present": np.bool_(present)}
        return ex


@dataclasses.dataclass
class Spectrogram(grain.transforms.Map):
    """Optional front end: log-magnitude STFT of the normalized signal. [T, 1] -> [frames, bins]."""

    frame_length: int = 64
    hop: int = 16

    def map(self, ex):
        sig = ex["out/signal"]
        x = sig["values"][:, 0]
        n_frames = 1 + (len(x) - self.frame_length) // self.hop
        idx = np.arange(self.frame_length)[None, :] + self.hop * np.arange(n_frames)[:, None]
        window = np.hanning(self.frame_length).astype(np.float32)
        spec = np.log1p(np.abs(np.fft.rfft(x[idx] * window, axis=-1))).astype(np.float32)
        present = sig["present"]
        ex["out/signal"] = {"values": spec * present, "mask": np.full(n_frames, bool(present)),
                            "present": present}
        return ex


@dataclasses.dataclass
class CollectLabels(grain.transforms.Map):
    tasks: Sequence[TaskSpec]

    def map(self, ex):
        labels, masks = {}, {}
        for t in self.tasks:
            if t.name not in ex["labels"]:
                raise DataError(f"{_pid(ex)}: unknown label {t.name!r}; the example has {sorted(ex['labels'])}")
            y = np.asarray(ex["labels"][t.name], np.float32)
            known = np.asarray(ex.get("label_known", {}).get(t.name, True), bool)
            labels[t.name] = y
            masks[t.name] = np.broadcast_to(known, y.shape).copy()
        ex["out/labels"], ex["out/label_mask"] = labels, masks
        return ex


@dataclasses.dataclass
class Assemble(grain.transforms.Map):
    """Keeps exactly the fields of the batch contract for the chosen modalities."""

    modalities: Sequence[str]

    def map(self, ex):
        out = {m: ex[f"out/{m}"] for m in self.modalities}
        out["labels"], out["label_mask"] = ex["out/labels"], ex["out/label_mask"]
        out["example_mask"] = np.bool_(True)
        out["patient_id"] = np.int64(ex["patient_id"])
        return out


@dataclasses.dataclass
class AugmentImages(grain.transforms.RandomMap):
    """Train-time image augmentation of a whole batch in one bilinear warp.

    Per image: random crop (as a zoom in [1, max_zoom] around a shifted centre), horizontal flip,
    rotation up to `max_degrees`, brightness and contrast jitter. Absent images stay zero.
    """

    max_zoom: float = 1.12
    max_shift: float = 0.06
    max_degrees: float = 8.0
    flip_probability: float = 0.5
    intensity: float = 0.1

    def random_map(self, batch, rng: np.random.Generator):
        if "image" not in batch:
            return batch
        x = batch["image"]["values"]  # [B, H, W, C]
        b, h, w, _ = x.shape
        f32 = np.float32
        zoom = rng.uniform(1.0, self.max_zoom, b).astype(f32)
        theta = np.deg2rad(rng.uniform(-self.max_degrees, self.max_degrees, b)).astype(f32)
        flip = np.where(rng.random(b) < self.flip_probability, -1.0, 1.0).astype(f32)
        shift = rng.uniform(-self.max_shift, self.max_shift, (2, b)).astype(f32)
        # Source pixel coordinates as an affine map of output pixel indices: src = A @ (i, j) + t.
        cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
        sy, sx = (h - 1) / 2, (w - 1) / 2
        i = np.arange(h, dtype=f32)[None, :, None]
        j = np.arange(w, dtype=f32)[None, None, :]
        col = lambda a: a[:, None, None]
        # x_src (pixels) = sx * (flip * (cos * gx - sin * gy) + shift_x + 1), with gx = j / sx - 1
        ax, bx = col(flip * cos), col(-flip * sin * sx / sy)
        cx = col(sx * (flip * (-cos + sin) + shift[0] + 1))
        ay, by = col(sin * sy / sx), col(cos)
        cy = col(sy * (-sin - cos + shift[1] + 1))
        src_x = ax * j + (bx * i + cx)
        src_y = ay * j + (by * i + cy)
        out = _bilinear(x, src_y, src_x)
        gain = (1.0 + rng.uniform(-self.intensity, self.intensity, b)).astype(f32)
        bias = rng.uniform(-self.intensity, self.intensity, b).astype(f32)
        out = out * gain[:, None, None, None] + bias[:, None, None, None]
        present = batch["image"]["present"].astype(np.float32)[:, None, None, None]
        batch["image"] = {"values": (out * present).astype(np.float32), "present": batch["image"]["present"]}
        return batch


def _bilinear(x, yy, xx):
    """Samples x [B, H, W, C] at fractional (yy, xx) [B, H, W]; edges are clamped.

    Works in place on `yy` and `xx` and reuses buffers: on a 64x64 batch this is ~2.5x faster
    than the straightforward version, whose fresh temporaries each cost page faults.
    """
    b, h, w, c = x.shape
    np.clip(yy, 0.0, h - 1.0, out=yy)
    np.clip(xx, 0.0, w - 1.0, out=xx)
    idx = yy.astype(np.int32)
    np.minimum(idx, h - 2, out=idx)
    x0 = xx.astype(np.int32)
    np.minimum(x0, w - 2, out=x0)
    np.subtract(yy, idx, out=yy, casting="unsafe")  # yy is now the row fraction
    np.subtract(xx, x0, out=xx, casting="unsafe")
    idx += np.arange(b, dtype=np.int32)[:, None, None] * h
    idx *= w
    idx += x0  # flat index of the top-left neighbour
    out = np.empty_like(x)
    a, d = np.empty_like(yy), np.empty_like(yy)
    for ch in range(c):
        flat = np.ascontiguousarray(x[..., ch]).reshape(-1)
        top = np.take(flat, idx)
        np.take(flat, idx + 1, out=a)
        a -= top
        a *= xx
        top += a
        bottom = np.take(flat, idx + w)
        np.take(flat, idx + (w + 1), out=d)
        d -= bottom
        d *= xx
        bottom += d
        bottom -= top
        bottom *= yy
        bottom += top
        out[..., ch] = bottom
    return out
