"""PneumoniaMNIST -> mmjax manifest: 28x28 chest X-ray -> pneumonia.

PneumoniaMNIST from MedMNIST v2 (Yang, Shi, Wei et al.: "MedMNIST v2 - A large-scale lightweight
benchmark for 2D and 3D biomedical image classification", Scientific Data 10, 41, 2023; CC BY
4.0), pediatric chest X-rays of Kermany et al. (Cell 2018) resized to 28x28 grayscale, in one
`pneumoniamnist.npz` with keys {train,val,test}_images (N, 28, 28) uint8 and _labels (N, 1).

The converter writes each image as a PNG under `out_dir/images/<split>/<index>.png` (a file is
rewritten only when its bytes change) and one manifest row per image: id `<split>-<index>`,
split train / validation / test as published (val -> validation), modality `xray` and task
`pneumonia` (binary: 0 normal, 1 pneumonia). There are no patient ids, so the published splits
are kept as they are.

On the copy in ../shared/data (a mirror's subset: its train split lacks most normal images):
train 3,882 (388 normal / 3,494 pneumonia), validation 524 (135 / 389), test 624 (234 / 390).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from mmjax.data.public import csv_text, flow, require, write_if_changed, write_outputs

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # npz key prefix -> manifest split


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(source_dir: str, out_dir: str) -> tuple[str, str]:
    require(source_dir, "pneumoniamnist.npz")
    rows = []
    with np.load(os.path.join(source_dir, "pneumoniamnist.npz")) as npz:
        missing = [f"{k}_{part}" for k in SPLITS for part in ("images", "labels") if f"{k}_{part}" not in npz]
        if missing:
            raise ValueError(f"{source_dir}/pneumoniamnist.npz lacks the arrays {missing}")
        for key, split in SPLITS.items():
            images, labels = npz[f"{key}_images"], npz[f"{key}_labels"].reshape(-1)
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                path = f"images/{split}/{i}.png"
                write_if_changed(os.path.join(out_dir, path), png_bytes(image))
                rows.append([f"{split}-{i}", split, path, int(label)])
    manifest = csv_text(["id", "split", "image", "pneumonia"], rows)

    schema = f"""\
# PneumoniaMNIST (MedMNIST v2, Yang et al., Sci. Data 2023; CC BY 4.0); written by
# mmjax.data.public.pneumoniamnist. Images are PNGs under images/<split>/, converted from the npz.
id: id          # <split>-<index> in the npz; no patient ids, so the published splits are kept
split: split    # train / validation / test (the npz's 'val')
modalities:
  xray: {flow(dict(kind="image", column="image", size=28, channels=1))}
tasks:
  pneumonia: {flow(dict(kind="binary", column="pneumonia"))}   # 0 normal, 1 pneumonia
"""
    return write_outputs(out_dir, manifest, schema)
