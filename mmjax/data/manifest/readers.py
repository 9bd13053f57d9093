"""Decoders for the files a manifest row points to.

Every reader returns a plain numpy array (or str) and raises `ReadError` with a short reason when a file cannot be
used; the caller adds the row, column and path. Decoding is left to well-kept libraries, imported where they are used
so that a manifest with only images does not need wfdb installed (and vice versa):

  images   PNG, JPEG, TIFF, BMP, ... (anything Pillow opens)    Pillow
           DICOM (.dcm/.dicom, or 'DICM' at byte 128)           pydicom (compressed syntaxes: its pixel handlers)
  signals  .wav                                                 scipy.io.wavfile
           .npy                                                 numpy.load
           .csv                                                 pandas.read_csv
           .mat                                                 scipy.io.loadmat, or wfdb when <stem>.hea sits next
                                                                to it (PhysioNet/CinC 2021 keep WFDB signals in .mat)
           .hea or no extension (a WFDB record)                 wfdb.rdrecord
           resampling                                           scipy.signal.resample_poly
  text     inline in the cell, or the UTF-8 .txt file it names

Files are confined to the allowed roots (`inside`: '..', absolute paths and symlinks resolved), and an image's
pixel count is read from its header before it is decoded (`image_size`).
"""

from __future__ import annotations

import contextlib
import fractions
import os
from collections.abc import Sequence

import numpy as np


class ReadError(ValueError):
    """A file that cannot be used; the message says why (the caller adds row/column/file)."""


def resolve(path: str, base_dir: str) -> str:
    """`path` with '~' expanded; a relative path is taken relative to `base_dir`."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(base_dir), path)
    return os.path.normpath(path)


def inside(path: str, roots: Sequence[str]) -> bool:
    """Whether `path`, with its symlinks and '..' resolved, lies in one of `roots` (real paths)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in roots)


def files_read(path: str, kind: str) -> list[str]:
    """The files a reader opens for the cell resolved to `path`: the path, and for a WFDB record (named with or
    without '.hea', or by its .mat data file as in CinC 2021) its header and data files beside it."""
    stem, ext = os.path.splitext(path)
    if kind != "signal" or ext.lower() not in ("", ".hea", ".mat"):
        return [path]
    siblings = (stem + ".hea", stem + ".mat", stem + ".dat")
    return [path] + [sib for sib in siblings if sib != path and os.path.exists(sib)]


def is_text_path(cell: str) -> bool:
    """Whether a text cell looks like a file name: one line ending in '.txt'."""
    name = cell.strip()
    return "\n" not in name and name.lower().endswith(".txt")


def text_path(cell: str, base_dir: str, file: bool | None = None) -> str | None:
    """The file a text cell names, or None when the cell is the text itself. `file` (the schema's): True, every
    cell is a path; False, none is; unset, a cell is a path when it is one line ending in '.txt' that names an
    existing file (a note such as '... see discharge.txt' stays a note)."""
    if file is False:
        return None
    name = cell.strip()
    if file:
        return resolve(name, base_dir)
    if not is_text_path(name):
        return None
    # the OS resolves the joined path (resolve's normpath would turn 'see ../x.txt' into 'x.txt')
    joined = os.path.join(os.path.expanduser(base_dir), os.path.expanduser(name))
    return resolve(name, base_dir) if os.path.isfile(joined) else None


def read_text(path: str) -> str:
    """The contents of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise ReadError("file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ReadError(f"not UTF-8 text ({e})") from e


# ----------------------------------------------------------------------------------------------------------- images


def read_image(path: str, size: int, channels: int, window: tuple[float, float] | None = None,
               max_pixels: int = 0) -> np.ndarray:
    """uint8 [size, size, channels]: the image scaled to fit, keeping its aspect ratio, centred on black.

    `channels` is 1 (grayscale) or 3 (RGB). `window` = (center, width) in modality units (e.g. Hounsfield) overrides a
    DICOM file's own window; it does not apply to other formats. An image of more than `max_pixels` pixels (all
    frames of a DICOM; 0: no cap) is refused from its header, before anything is decoded.
    """
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if window is not None and window[1] <= 0:
        raise ValueError(f"window width must be > 0, got {window}")
    if not os.path.isfile(path):
        raise ReadError("file not found")
    try:
        with _pillow_unlimited():
            if max_pixels:
                width, height, frames = image_size(path)
                if width * height * frames > max_pixels:
                    shape = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
                    raise ReadError(f"{width * height * frames} pixels ({shape}) are more than max_pixels={max_pixels} "
                                    f"(0: no cap)")
            img = _dicom_image(path, window) if _is_dicom(path) else _pillow_image(path)
            img = img.convert("L" if channels == 1 else "RGB")
            img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color=0, centering=(0.5, 0.5))
    except ReadError:
        raise
    except Exception as e:  # whatever the decoder raises, the file is unusable
        raise ReadError(f"cannot decode image ({type(e).__name__}: {e})") from e
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def image_size(path: str) -> tuple[int, int, int]:
    """(width, height, frames) from an image file's header; no pixel is decoded. Frames count for a DICOM, whose
    pixel data pydicom reads whole; other formats are decoded at their first frame only (frames 1)."""
    if _is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)
    from PIL import Image

    with Image.open(path) as f:  # lazy: the header only
        return f.size[0], f.size[1], 1


@contextlib.contextmanager
def _pillow_unlimited():
    """Pillow's own decompression-bomb limit (89M pixels, an error at twice that) off: `max_pixels` is the one cap."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _is_dicom(path: str) -> bool:
    if os.path.splitext(path)[1].lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as f:  # DICOM Part 10 files have a 128-byte preamble, then 'DICM', whatever their name
        return f.read(132)[128:] == b"DICM"


def _pillow_image(path: str):
    from PIL import Image, ImageOps

    with Image.open(path) as f:
        img = ImageOps.exif_transpose(f)  # camera JPEGs store their rotation in EXIF; also loads the pixels
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float grayscale (common for X-ray PNGs): convert('L') would clip at 255, so stretch it instead.
        img = Image.fromarray(_to_uint8(_min_max(_finite(np.asarray(img, dtype=np.float64), "in the file"))))
    return img


def _finite(x: np.ndarray, where: str) -> np.ndarray:
    """`x`, or ReadError if any value is NaN or infinite (it would become black silently)."""
    if not np.isfinite(x).all():
        raise ReadError(f"non-finite pixel values {where} ({int((~np.isfinite(x)).sum())} of {x.size})")
    return x


def _pydicom_luts():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut
    return apply_color_lut, apply_modality_lut, apply_voi_lut


def _dicom_image(path: str, window: tuple[float, float] | None):
    import pydicom
    from PIL import Image

    apply_color_lut, apply_modality_lut, apply_voi_lut = _pydicom_luts()
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    one_frame = frames > 1 and hasattr(ds, "pixel_array_options")
    if one_frame:  # pydicom 3 can decode only the frame we keep (the middle one)
        ds.pixel_array_options(index=frames // 2)
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:  # what pydicom raises when no handler can decode the syntax
        ts = ds.file_meta.get("TransferSyntaxUID")
        if ts is None or not ts.is_compressed:
            raise
        raise ReadError(
            f"cannot decode DICOM pixel data in transfer syntax '{ts.name}' ({ts}): no installed pixel handler "
            f"decoded it; {_handler_hint(ts.name)}"
        ) from e
    if frames > 1 and not one_frame:
        arr = arr[frames // 2]

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour; pydicom already converted YBR to RGB, and no modality/VOI LUT applies
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(_min_max(arr.astype(np.float64)))
        return Image.fromarray(rgb, "RGB")

    # stored values -> modality units (e.g. HU); a NaN RescaleSlope would give an all-black image
    x = _finite(np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), "after the modality LUT (RescaleSlope, "
                "RescaleIntercept)")
    if window is not None:
        center, width = window
        x = (x - (center - width / 2)) / width
    elif ds.get("VOILUTSequence"):
        # LUT output spans the LUT's bit depth, which files often fill only partly: stretch what it produced.
        x = _min_max(np.asarray(apply_voi_lut(np.rint(x).astype(np.int64), ds), dtype=np.float64))
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        x = np.asarray(apply_voi_lut(x, ds, prefer_lut=False), dtype=np.float64)
        # pydicom maps the window onto a range it derives from BitsStored/rescale; find it by windowing +-inf.
        with np.errstate(over="ignore"):
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, prefer_lut=False)
        x = (x - lo) / (hi - lo)
    else:
        x = _min_max(x)
    x = np.clip(_finite(x, "after the modality LUT and the window (WindowCenter, WindowWidth)"), 0.0, 1.0)
    if photometric == "MONOCHROME1":  # MONOCHROME1 shows the lowest value as white
        x = 1.0 - x
    return Image.fromarray(_to_uint8(x), "L")


def _handler_hint(syntax_name: str) -> str:
    if "2000" in syntax_name:  # JPEG 2000 and High-Throughput JPEG 2000
        package = "pylibjpeg and pylibjpeg-openjpeg"
    elif "JPEG" in syntax_name:  # JPEG baseline/extended/lossless and JPEG-LS
        package = "pylibjpeg and pylibjpeg-libjpeg"
    elif "RLE" in syntax_name:
        package = "pylibjpeg and pylibjpeg-rle"
    else:
        package = "pylibjpeg with its plugins"
    return f"install {package} (or python-gdcm) to decode it"


def _min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------- signals

_SIGNAL_EXTENSIONS = (".wav", ".npy", ".csv", ".mat", ".hea", "")


def read_signal(
    path: str, rate: float, channels, *, file_rate: float | None = None, variable: str | None = None
) -> np.ndarray:
    """float32 [T, C] at `rate` Hz.

    `channels`: an int (the file must have exactly that many), or a list of channel names (WFDB sig_name or CSV
    header) and/or integer indices, returned in that order. `file_rate` is the sampling rate of .npy/.csv/.mat arrays
    (default: already `rate`); .wav and WFDB files carry their own. `variable` names the array in a .mat file.
    """
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext not in _SIGNAL_EXTENSIONS:
        raise ReadError(f"unsupported signal format '{ext}'; use .wav .npy .csv .mat .hea")
    is_wfdb = ext in ("", ".hea") or (ext == ".mat" and os.path.isfile(stem + ".hea"))
    if not os.path.isfile(stem + ".hea" if ext in ("", ".hea") else path):
        raise ReadError("file not found")
    try:
        if is_wfdb:
            x, source_rate, names = _read_wfdb(stem)
        elif ext == ".wav":
            x, source_rate, names = _read_wav(path)
        elif ext == ".npy":
            x, source_rate, names = np.load(path, allow_pickle=False), None, None
        elif ext == ".csv":
            x, source_rate, names = _read_csv(path)
        else:
            x, source_rate, names = _read_mat(path, variable)
        x = np.asarray(x, dtype=np.float64)
    except ReadError:
        raise
    except Exception as e:  # whatever the decoder raises, the file is unusable
        raise ReadError(f"cannot read signal ({type(e).__name__}: {e})") from e

    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ReadError(f"expected a 1-D or 2-D signal, got shape {x.shape}")
    if x.size == 0:
        raise ReadError("contains no samples")
    if names is None:  # named columns are channels; a bare array may be stored channels-first
        x = _time_first(x, channels)
    x = _select_channels(x, names, channels)
    if not np.isfinite(x).all():
        raise ReadError("contains NaN or infinite samples")

    source_rate = source_rate or file_rate or rate
    if source_rate != rate:
        ratio = fractions.Fraction(rate / source_rate).limit_denominator(1000)
        if ratio != 1:
            from scipy.signal import resample_poly

            x = resample_poly(x, ratio.numerator, ratio.denominator, axis=0)  # polyphase, with anti-alias filter
    return x.astype(np.float32)


def read_signal_header(path: str) -> dict:
    """A WFDB record's header: {'fs': float, 'sig_name': [...], 'comments': [...]} (CinC puts Age/Sex in comments)."""
    import wfdb

    stem, ext = os.path.splitext(path)
    record = stem if ext.lower() in (".hea", ".mat", ".dat") else path
    if not os.path.isfile(record + ".hea"):
        raise ReadError("file not found")
    try:
        header = wfdb.rdheader(record)
    except Exception as e:
        raise ReadError(f"cannot read WFDB header ({type(e).__name__}: {e})") from e
    return {"fs": float(header.fs), "sig_name": list(header.sig_name or []), "comments": list(header.comments or [])}


def _read_wfdb(record: str):
    import wfdb

    rec = wfdb.rdrecord(record)  # physical units (p_signal); the header names the data file, .dat or .mat
    return rec.p_signal, float(rec.fs), list(rec.sig_name)


def _read_wav(path: str):
    from scipy.io import wavfile

    fs, x = wavfile.read(path)
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        x = (x.astype(np.float64) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.integer):  # scipy left-justifies other depths (24-bit in int32): full scale
        x = x / -float(np.iinfo(x.dtype).min)
    return x, float(fs), None


def _read_csv(path: str):
    import pandas as pd

    table = pd.read_csv(path, header=None, dtype=str, skipinitialspace=True)
    first = [v.strip() for v in table.iloc[0] if isinstance(v, str)]
    names = None
    if not all(_is_number(v) for v in first):  # a header row of channel names
        names = [str(v).strip() for v in table.iloc[0]]
        table = table.iloc[1:]
    x = table.apply(pd.to_numeric).to_numpy(dtype=np.float64)
    if names is not None:  # a time axis is not a channel
        keep = [i for i, n in enumerate(names) if n.lower() not in ("time", "t")]
        x, names = x[:, keep], [names[i] for i in keep]
    return x, None, names


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_mat(path: str, variable: str | None):
    from scipy.io import loadmat

    contents = loadmat(path)
    keys = [k for k in contents if not k.startswith("__")]  # '__header__' etc. are MATLAB metadata
    if variable is None:
        if len(keys) != 1:
            raise ReadError(f"has variables {keys}; set `variable` to choose one" if keys else "contains no arrays")
        variable = keys[0]
    elif variable not in keys:
        raise ReadError(f"has no variable {variable!r}; it has {keys}")
    return contents[variable], None, None


def _time_first(x: np.ndarray, channels) -> np.ndarray:
    """Transpose a channels-first array (such as CinC's [12, 5000]) to [T, C]."""
    if isinstance(channels, int | np.integer):
        return x.T if x.shape[0] == channels and x.shape[1] != channels else x
    return x.T if x.shape[0] < x.shape[1] else x  # channels chosen by index: recordings are longer than wide


def _select_channels(x: np.ndarray, names: list[str] | None, channels) -> np.ndarray:
    n = x.shape[1]
    if isinstance(channels, int | np.integer):
        if n != channels:
            raise ReadError(f"has {n} channels, expected {channels}")
        return x
    if isinstance(channels, str):
        channels = [channels]
    index = []
    for ch in channels:
        if isinstance(ch, str):
            if names is None or ch not in names:
                known = f"the file's channels are {names}" if names else "the file has no channel names"
                raise ReadError(f"no channel named {ch!r}; {known}")
            index.append(names.index(ch))
        elif -n <= ch < n:
            index.append(int(ch))
        else:
            raise ReadError(f"channel index {ch} out of range; the file has {n} channels")
    return x[:, index]
