"""Manifest preparation rate: rows/s for PNG and for DICOM images (decode, resize to 224, write).

    python benchmarks/prepare_rate.py [--rows=400] [--source_size=512] [--workers=0 (all cores)]

Writes `rows` 512x512 grayscale PNGs and as many DICOMs (CT_small.dcm from pydicom's test files
with 512x512 random 16-bit pixels and a rescale slope/intercept) into a temporary folder, then times
`mmjax.data.manifest.builder.load` on each manifest (parallel decoding, statistics, array_record
writing). Not run in CI.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

_ROWS = flags.DEFINE_integer("rows", 400, "Rows (one image each) per format.")
_SOURCE = flags.DEFINE_integer("source_size", 512, "Side of the source images in pixels.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding processes (0: all cores).")


def _write_png(folder, n, size, rng):
    from PIL import Image

    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return [f"{i}.png" for i in range(n)]


def _write_dicom(folder, n, size, rng):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    for i in range(n):
        ds = template.copy()
        pixels = rng.integers(0, 4000, (size, size), dtype=np.uint16).astype(np.int16)
        ds.Rows = ds.Columns = size
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(os.path.join(folder, f"{i}.dcm"))
    return [f"{i}.dcm" for i in range(n)]


def measure(kind: str, n: int, size: int, workers: int | None) -> dict:
    from mmjax.data.manifest import builder

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        names = (_write_png if kind == "png" else _write_dicom)(tmp, n, size, rng)
        with open(os.path.join(tmp, "manifest.csv"), "w") as f:
            f.write("id,image,label\n" + "".join(f"p{i},{name},{i % 2}\n" for i, name in enumerate(names)))
        with open(os.path.join(tmp, "schema.yaml"), "w") as f:
            f.write("id: id\nmodalities:\n  image: {kind: image, column: image, size: 224, channels: 1}\n"
                    "tasks:\n  label: {kind: binary, column: label}\n")
        start = time.perf_counter()
        builder.load(os.path.join(tmp, "manifest.csv"), os.path.join(tmp, "schema.yaml"), os.path.join(tmp, "tfds"),
                     workers=workers, log=lambda _: None)
        seconds = time.perf_counter() - start
    return {"format": kind, "rows": n, "source_size": size, "cpus": os.cpu_count(), "seconds": round(seconds, 2),
            "rows_per_s": round(n / seconds, 1)}


def main(argv):
    del argv
    for kind in ("png", "dicom"):
        print(json.dumps(measure(kind, _ROWS.value, _SOURCE.value, _WORKERS.value or None)), flush=True)


if __name__ == "__main__":
    app.run(main)
