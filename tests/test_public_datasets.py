"""Converters of public datasets to manifests (mmjax.data.public), on the copies in ../shared/data.

Each dataset's tests skip when its folder is absent. Expected numbers are computed here from the
source files, independently of the converters.
"""

import collections
import csv
import json
import os
import pathlib

import numpy as np
import pytest
import yaml

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def source(folder: str) -> pathlib.Path:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent (public data copy not available)")
    return path


def read_manifest(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def files_state(out_dir: pathlib.Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out_dir.rglob("*")) if p.is_file()}


def convert(module, folder: str, out_dir: pathlib.Path):
    """Run the converter twice: the second call must leave every file's bytes and mtime unchanged."""
    manifest, schema = module.write_manifest(str(source(folder)), str(out_dir))
    assert (manifest, schema) == (str(out_dir / "manifest.csv"), str(out_dir / "schema.yaml"))
    before = files_state(out_dir)
    assert module.write_manifest(str(source(folder)), str(out_dir)) == (manifest, schema)
    assert files_state(out_dir) == before
    with open(schema) as f:
        return read_manifest(manifest), yaml.safe_load(f)


def assert_files_exist(rows, column, out_dir):
    missing = [r[column] for r in rows if r[column] and not (out_dir / r[column]).is_file()]
    assert not missing, missing[:5]


def assert_disjoint_splits(rows):
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    splits = collections.defaultdict(set)
    for r in rows:
        splits[r["id"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())


def top_k(counter: collections.Counter, k: int) -> list[str]:
    return sorted(counter, key=lambda x: (-counter[x], x))[:k]


# --- VQA-RAD ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from mmjax.data.public import vqa_rad

    out = tmp_path_factory.mktemp("vqa_rad")
    return out, *convert(vqa_rad, "vqa_rad", out)


def test_vqa_rad(vqa):
    out, rows, schema = vqa
    src = SHARED / "vqa_rad"
    closed = {}
    for name in ("train", "test"):
        closed[name] = [q for q in json.loads((src / f"{name}set.json").read_text())
                        if q["answer_type"].strip() == "CLOSED"]
    n_split = collections.Counter(r["split"] for r in rows)
    train_images = {q["image_name"] for q in closed["train"]}
    val_images = {pathlib.PurePath(r["image"]).name for r in rows if r["split"] == "validation"}
    assert len(val_images) == round(0.1 * len(train_images)) == 29
    assert n_split["test"] == len(closed["test"]) == 272
    assert n_split["train"] + n_split["validation"] == len(closed["train"]) == 1823
    assert n_split["validation"] == sum(q["image_name"] in val_images for q in closed["train"])
    assert not val_images & {pathlib.PurePath(r["image"]).name for r in rows if r["split"] == "train"}
    assert_disjoint_splits(rows)
    assert_files_exist(rows, "image", out)

    def norm(a):
        return str(a).strip().lower().rstrip(".").strip()

    counts = collections.Counter(norm(q["answer"]) for q in closed["train"])
    classes = sorted(a for a, n in counts.items() if n >= 2) + ["other"]
    assert schema["id"] == "id" and schema["split"] == "split"
    assert schema["modalities"] == {"image": {"kind": "image", "column": "image", "size": 224, "channels": 3},
                                    "question": {"kind": "text", "column": "question"}}
    assert schema["tasks"] == {"answer": {"kind": "multiclass", "column": "answer", "classes": classes}}
    assert classes[:2] == ["asymmetric", "bilateral frontal lobes"] and "no" in classes and "yes" in classes
    assert {r["answer"] for r in rows} <= set(classes)
    answers = collections.Counter(r["answer"] for r in rows if r["split"] == "test")
    assert (answers["no"], answers["yes"], answers["other"]) == (133, 118, 15)

    first = rows[0]
    assert first["id"] == "train-1" and first["answer"] == "yes"
    assert first["question"] == "Are regions of the brain infarcted?" and first["image"].endswith("/synpic54610.jpg")


# --- IU X-ray reports ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iu(tmp_path_factory):
    from mmjax.data.public import iu_xray

    out = tmp_path_factory.mktemp("iu_xray")
    return out, *convert(iu_xray, "iu_xray_reports", out)


def test_iu_xray(iu):
    _, rows, schema = iu
    with open(SHARED / "iu_xray_reports" / "indiana_reports.csv", newline="") as f:
        reports = list(csv.DictReader(f))
    assert len(rows) == len(reports) == 3851
    assert [r["id"] for r in rows] == [r["uid"] for r in reports]
    assert len({r["id"] for r in rows}) == len(rows)
    assert "split" not in schema and "split" not in rows[0]
    assert schema["modalities"] == {"indication": {"kind": "text", "column": "indication"},
                                    "findings": {"kind": "text", "column": "findings"}}
    counts = collections.Counter(p for r in reports for p in {s.strip() for s in r["Problems"].split(";")})
    classes = top_k(counts, 10)
    assert classes[:4] == ["normal", "Lung", "Opacity", "Cardiomegaly"]
    assert schema["tasks"] == {"problems": {"kind": "multilabel", "column": "problems", "separator": ";",
                                            "other_labels": "ignore", "classes": classes}}

    assert sum(bool(r["findings"]) for r in rows) == sum(bool(r["findings"].strip()) for r in reports) == 3337
    assert sum(bool(r["indication"]) for r in rows) == 3851 - 86 - 3  # empty, '#NAME?'
    assert sum(not r["problems"] for r in rows) == sum(r["Problems"] == "No Indexing" for r in reports) == 92
    by_id = {r["id"]: r for r in rows}
    assert by_id["1"]["indication"] == "Positive TB test" and by_id["1"]["problems"] == "normal"
    assert by_id["1"]["findings"].startswith("The cardiac silhouette and mediastinum size")
    assert "There are no XXXX of a pleural effusion." in by_id["1"]["findings"]  # anonymization kept
    assert by_id["2"]["problems"] == "Cardiomegaly;Pulmonary Artery"
    assert by_id["3"]["findings"] == ""
    assert "impression" not in rows[0]


# --- PneumoniaMNIST --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pneumonia(tmp_path_factory):
    from mmjax.data.public import pneumoniamnist

    out = tmp_path_factory.mktemp("pneumoniamnist")
    return out, *convert(pneumoniamnist, "pneumoniamnist", out)


def test_pneumoniamnist(pneumonia):
    from PIL import Image

    out, rows, schema = pneumonia
    with np.load(SHARED / "pneumoniamnist" / "pneumoniamnist.npz") as npz:
        data = {split: (npz[f"{key}_images"], npz[f"{key}_labels"].reshape(-1))
                for key, split in (("train", "train"), ("val", "validation"), ("test", "test"))}
    n_split = collections.Counter(r["split"] for r in rows)
    assert n_split == {split: len(labels) for split, (_, labels) in data.items()}
    assert n_split == {"train": 3882, "validation": 524, "test": 624}
    assert_disjoint_splits(rows)
    assert_files_exist(rows, "image", out)
    assert len(list((out / "images").rglob("*.png"))) == len(rows)
    assert schema == {"id": "id", "split": "split",
                      "modalities": {"xray": {"kind": "image", "column": "image", "size": 28, "channels": 1}},
                      "tasks": {"pneumonia": {"kind": "binary", "column": "pneumonia"}}}
    for split, (images, labels) in data.items():
        got = [int(r["pneumonia"]) for r in rows if r["split"] == split]
        assert got == labels.tolist()
        for i in (0, len(images) - 1):
            row = next(r for r in rows if r["id"] == f"{split}-{i}")
            assert row["image"] == f"images/{split}/{i}.png"
            with Image.open(out / row["image"]) as im:
                assert im.mode == "L" and im.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(im), images[i])


# --- PhysioNet/CinC 2021 sample --------------------------------------------------------------


@pytest.fixture(scope="module")
def cinc(tmp_path_factory):
    from mmjax.data.public import cinc2021

    out = tmp_path_factory.mktemp("cinc2021")
    return out, *convert(cinc2021, "cinc2021_sample", out)


def test_cinc2021(cinc):
    out, rows, schema = cinc
    src = SHARED / "cinc2021_sample"
    with open(src / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [r["record"] for r in index] and len(rows) == 50
    assert_files_exist(rows, "ecg", out)
    assert all((out / r["ecg"]).with_suffix(".mat").is_file() and r["ecg"].endswith(f"records/{r['id']}.hea")
               for r in rows)
    assert "split" not in schema
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert schema["modalities"] == {
        "ecg": {"kind": "signal", "column": "ecg", "rate": 100, "seconds": 10, "channels": leads},
        "demographics": {"kind": "tabular", "numeric": ["age"], "categorical": ["sex"]}}
    counts = collections.Counter(c for r in index for c in r["dx_snomed"].split(","))
    classes = top_k(counts, 5)
    assert classes == ["427084000", "284470004", "426783006", "164934002", "698252002"]
    assert schema["tasks"] == {"dx": {"kind": "multilabel", "column": "dx", "separator": ";",
                                     "other_labels": "ignore", "classes": classes}}
    assert collections.Counter(r["sex"] for r in rows) == {"Female": 27, "Male": 23}

    # the first record, against its header read as text
    header = (src / "records" / "E07500.hea").read_text().splitlines()
    fields = dict(line[1:].strip().split(": ", 1) for line in header if line.startswith("#") and ": " in line)
    first = rows[0]
    assert (first["id"], first["age"], first["sex"]) == ("E07500", "78", "Male") == ("E07500", fields["Age"],
                                                                                     fields["Sex"])
    assert first["dx"] == fields["Dx"].replace(",", ";") == "67741000119109;426177001"
    for row, entry in zip(rows, index):
        assert (row["age"], row["sex"], row["dx"]) == (entry["age"], entry["sex"], entry["dx_snomed"].replace(",", ";"))


# --- missing source files --------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("vqa_rad", "trainset.json"), ("iu_xray", "indiana_reports.csv"),
                                            ("pneumoniamnist", "pneumoniamnist.npz"), ("cinc2021", "index.csv")])
def test_missing_source_files(tmp_path, name, expected):
    import importlib

    module = importlib.import_module(f"mmjax.data.public.{name}")
    with pytest.raises(FileNotFoundError, match=expected):
        module.write_manifest(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "manifest.csv")
