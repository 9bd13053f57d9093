"""Converters from the published layouts of public medical datasets to mmjax manifests.

Each module exposes `write_manifest(source_dir, out_dir) -> (manifest_path, schema_path)`: it
writes `out_dir/manifest.csv` (one row per example) and `out_dir/schema.yaml` (the manifest
dataset's schema: id, split, modalities, tasks). Paths in the manifest are relative to `out_dir`
and point into `source_dir`, which is never copied. A second call writes nothing when the content
is unchanged, so file mtimes stay put and mmjax does not rebuild the dataset.

    vqa_rad         VQA-RAD: radiology image + question -> closed answer (multiclass, mostly yes/no)
    iu_xray         Indiana University chest X-ray reports: indication + findings -> Problems (multilabel)
    pneumoniamnist  PneumoniaMNIST (MedMNIST v2): 28x28 chest X-ray -> pneumonia (binary); writes PNGs
    cinc2021        PhysioNet/CinC Challenge 2021 sample: 12-lead ECG + age/sex -> SNOMED-CT codes (multilabel)

    from mmjax.data.public import vqa_rad
    manifest, schema = vqa_rad.write_manifest("../shared/data/vqa_rad", "/tmp/vqa_rad")

The helpers below are shared by the converters.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence

import yaml

MANIFEST = "manifest.csv"
SCHEMA = "schema.yaml"


def require(source_dir: str, *names: str) -> None:
    """Raise FileNotFoundError naming every one of `names` (relative to `source_dir`) that is missing."""
    missing = [n for n in names if not os.path.exists(os.path.join(source_dir, n))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{source_dir}: missing {shown}")


def relpath(path: str, out_dir: str) -> str:
    """`path` relative to `out_dir` (the manifest's folder), with '/' separators."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir)).replace(os.sep, "/")


def write_if_changed(path: str, data: bytes | str) -> bool:
    """Write `data` to `path` unless the file already holds exactly these bytes; True if written."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV with '\\n' line ends; None becomes an empty cell (an absent modality or unknown label)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def flow(value) -> str:
    """`value` as a one-line YAML flow collection, keys in the given order: {kind: image, size: 224}."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()


def block_list(items: Sequence, indent: int, comments: Sequence[str] | None = None) -> str:
    """YAML block sequence, one `- item` a line at `indent` spaces, each with an optional `# comment`."""
    lines = []
    for i, item in enumerate(items):
        line = " " * indent + "- " + flow([item])[1:-1]
        if comments and comments[i]:
            line = f"{line:<{indent + 26}}  # {comments[i]}"
        lines.append(line)
    return "\n".join(lines)


def write_outputs(out_dir: str, manifest: str, schema: str) -> tuple[str, str]:
    """Write manifest and schema into `out_dir` (only what changed); return their paths."""
    yaml.safe_load(schema)  # a hand-written schema must at least parse
    paths = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, SCHEMA)
    write_if_changed(paths[0], manifest)
    write_if_changed(paths[1], schema)
    return paths
