"""The manifest dataset end to end: a manifest with every kind and file format is written in a tmp folder,
prepared with `builder.load`, read through the pipeline and compared with what was written."""

import csv
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mmjax.batch import validate_batch
from mmjax.data import pipeline
from mmjax.data.local_info import LocalDatasetInfo
from mmjax.data.manifest import builder as mb
from mmjax.data.manifest import table
from mmjax.data.manifest.schema import Schema
from mmjax.data.spec import DataError, DatasetSpec
from mmjax.data.tokenizer import WordPieceTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_ROWS = 48
RATE, SECONDS, LENGTH = 50, 2, 100
SHORT_ROW, LONG_ROW, WAV100_ROW, BARE_WFDB_ROW = 1, 25, 30, 33  # 0-based manifest rows with special signals
TXT_ROWS = {2: "Patient seen today. Xylophone shaped density at the left base.\nNo acute change.\n",
            8: "Follow up: quokka sign resolved, mild cough persists.\n"}
WORDS = ("cough fever mild opacity left lower lobe stable no acute change pain shortness of breath chest clear "
         "right upper effusion small wheeze heart size normal").split()


def _split(i):
    return ("train", "train", "train", "train", "validation", "test")[i % 6]


def _signal(i, n):
    rng = np.random.default_rng(i)
    t = np.arange(n) / RATE
    return np.stack([np.sin(2 * np.pi * 1.3 * t + i) * (1 + i / 10) + 0.1 * rng.standard_normal(n),
                     0.5 * rng.standard_normal(n) + 2.0], 1).astype(np.float32)


def _standardize(x):
    x = x - x.mean(axis=0)
    return x / (np.sqrt((x * x).mean(axis=0)) + 1e-6)


def _write_signal(folder: pathlib.Path, i: int) -> tuple[str, np.ndarray]:
    """(manifest cell, expected [T, 2] float32 at RATE Hz) of row i's ECG, in the format chosen for that row."""
    from scipy import signal as sps
    from scipy.io import savemat, wavfile

    d = folder / "signals"
    if i == SHORT_ROW:
        x = _signal(i, LENGTH // 2)
        np.save(d / f"e{i}.npy", x)
        return f"signals/e{i}.npy", x
    if i == LONG_ROW:
        x = _signal(i, LENGTH * 2)
        np.save(d / f"e{i}.npy", x)
        return f"signals/e{i}.npy", x
    if i == WAV100_ROW:  # recorded at 100 Hz: resampled to the schema's 50 Hz
        x = _signal(i, LENGTH * 2)
        wavfile.write(d / f"e{i}.wav", 2 * RATE, x)
        return f"signals/e{i}.wav", sps.resample_poly(x.astype(np.float64), 1, 2, axis=0).astype(np.float32)
    x = _signal(i, LENGTH)
    if i == BARE_WFDB_ROW or i % 5 == 4:
        import wfdb

        wfdb.wrsamp(f"e{i}", fs=RATE, units=["mV", "mV"], sig_name=["I", "II"], p_signal=x.astype(np.float64),
                    fmt=["16", "16"], write_dir=str(d))
        return (f"signals/e{i}" if i == BARE_WFDB_ROW else f"signals/e{i}.hea"), x
    if i % 5 == 0:
        wavfile.write(d / f"e{i}.wav", RATE, x)  # float32 WAV: read back unscaled
        return f"signals/e{i}.wav", x
    if i % 5 == 1:
        np.save(d / f"e{i}.npy", x.T if i == 11 else x)  # one stored channels-first
        return f"signals/e{i}.npy", x
    if i % 5 == 2:
        t = (np.arange(len(x)) / RATE)[:, None]
        np.savetxt(d / f"e{i}.csv", np.concatenate([t, x], 1), fmt="%.9g", delimiter=",", header="time,I,II",
                   comments="")
        return f"signals/e{i}.csv", x
    savemat(d / f"e{i}.mat", {"sig": x.T, "other": np.ones(3)})  # channels-first, beside another variable
    return f"signals/e{i}.mat", x


def _rows(folder: pathlib.Path):
    """Writes every file and returns (manifest rows as dicts of str, {row: expected signal}, {row: source image})."""
    from pydicom.data import get_testdata_file

    for sub in ("imgs", "signals", "notes"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, signals, images = [], {}, {}
    combos = ["effusion", "edema;nodule", "effusion; edema", "nodule"]
    for i in range(N_ROWS):
        r = {"pid": f"p{i:03d}", "split": _split(i)}
        # images: frontal PNG (grayscale) or DICOM, lateral JPG (RGB)
        if i in (3, 10):
            r["frontal"] = ""
        elif i == 0:
            shutil.copy(get_testdata_file("CT_small.dcm", download=False), folder / "imgs" / "f0.dcm")
            r["frontal"] = "imgs/f0.dcm"
        elif i == 23:  # a DICOM without extension: found by its 'DICM' magic
            shutil.copy(get_testdata_file("MR_small.dcm", download=False), folder / "imgs" / "f23")
            r["frontal"] = "imgs/f23"
        else:
            img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(img, "L").save(folder / "imgs" / f"f{i}.png")
            images[i] = img
            r["frontal"] = f"imgs/f{i}.png"
        if i in (2, 15):
            r["lateral"] = ""
        else:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(
                folder / "imgs" / f"l{i}.jpg", quality=95)
            r["lateral"] = f"imgs/l{i}.jpg"
        # text: inline, or a .txt file
        if i in (6, 20):
            r["note"] = ""
        elif i in TXT_ROWS:
            (folder / "notes" / f"n{i}.txt").write_text(TXT_ROWS[i], encoding="utf-8")
            r["note"] = f"notes/n{i}.txt"
        else:
            r["note"] = " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 8)) + "."
        # tabular: age, crp (log-scaled), sex, site ('D' appears only in test rows)
        r["age"] = "" if i == 12 else f"{20 + (i * 7) % 60 + 0.5 * (i % 2):g}"
        r["crp"] = "" if i in (5, 12, 17) else f"{math.exp(0.1 * ((i * 13) % 50)):.4f}"
        r["sex"] = "" if i in (9, 12) else "FM"[i % 2]
        r["site"] = "" if i == 12 else ("D" if i in (11, 23) else "ABC"[i % 3])
        # signal
        if i in (14, 19):
            r["ecg"] = ""
        else:
            r["ecg"], signals[i] = _write_signal(folder, i)
        # tasks: binary yes/no, multiclass, multilabel list, regression; some unknown
        r["died"] = "" if i == 7 else ("yes" if i % 4 in (1, 2) else "no")
        r["dx"] = "" if i == 8 else ("asthma", "copd", "normal")[(i // 6) % 3]
        r["findings"] = "" if i == 9 else combos[(i // 6 + i % 2) % 4]
        r["los"] = "" if i == 13 else f"{1.5 + 0.25 * i:g}"
        rows.append(r)
    return rows, signals, images


SCHEMA = {
    "name": "allkinds", "id": "pid", "split": "split",
    "modalities": {
        "frontal": {"kind": "image", "column": "frontal", "size": 16, "channels": 1},
        "lateral": {"kind": "image", "column": "lateral", "size": 16, "channels": 3},
        "note": {"kind": "text", "column": "note"},
        "labs": {"kind": "tabular", "numeric": ["age", "crp"], "categorical": ["sex", "site"], "log": ["crp"]},
        "ecg": {"kind": "signal", "column": "ecg", "rate": RATE, "seconds": SECONDS, "channels": 2,
                "variable": "sig"},
    },
    "tasks": {
        "died": {"kind": "binary", "column": "died"},
        "dx": {"kind": "multiclass", "column": "dx"},
        "findings": {"kind": "multilabel", "column": "findings", "separator": ";",
                     "classes": ["effusion", "edema", "nodule"]},
        "los": {"kind": "regression", "column": "los"},
    },
}


def _write_schema(path, schema):
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return str(path)


def _write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """The every-kind manifest, prepared once with 2 decoding processes (>= 64 files: the parallel path)."""
    folder = tmp_path_factory.mktemp("study")
    rows, signals, images = _rows(folder)
    manifest = _write_csv(folder / "manifest.csv", rows)
    schema = _write_schema(folder / "schema.yaml", SCHEMA)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    messages = []
    builder = mb.load(manifest, schema, data_dir, workers=2, log=messages.append)
    spec = DatasetSpec.from_builder(builder)
    return types.SimpleNamespace(folder=folder, rows=rows, signals=signals, images=images, manifest=manifest,
                                 schema=schema, data_dir=data_dir, builder=builder, spec=spec, messages=messages)


def _eval_rows(ds, split):
    """{patient id: that row of the evaluation batches} over one pass of `split`."""
    out = {}
    for batch in pipeline.eval_batches(ds.builder, ds.spec, split, 16, shard_index=0, shard_count=1):
        validate_batch(batch, ds.spec.tasks, ds.spec.modalities)
        for b in np.flatnonzero(batch["example_mask"]):
            pick = lambda d: {k: pick(v) if isinstance(v, dict) else v[b] for k, v in d.items()}  # noqa: B023
            out[str(batch["patient_id"][b])] = pick({k: v for k, v in batch.items() if k != "patient_id"})
    return out


@pytest.fixture(scope="module")
def evaluated(ds):
    return {split: _eval_rows(ds, split) for split in ("train", "validation", "test")}


def _ids(builder, split):
    source = builder.as_data_source(split)
    return [_text(source[k]["patient_id"]) for k in range(len(source))]


def _text(x):
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _raw(builder, split):
    """{manifest row (0-based): raw example} of one split."""
    source = builder.as_data_source(split)
    return {int(source[k]["row"]) - 1: source[k] for k in range(len(source))}


# ------------------------------------------------------------------------------------------- 1. preparation


def test_prepared_with_parallel_decoding_and_split_sizes(ds):
    assert any("on 2 process(es)" in m for m in ds.messages), ds.messages
    assert any(m.startswith("Preparing ") for m in ds.messages) and not any("Rebuilding" in m for m in ds.messages)
    assert ds.spec.split_sizes == {"train": 32, "validation": 8, "test": 8}
    assert ds.builder.info.metadata["summary"]["files"] == sum(
        bool(r[c]) for r in ds.rows for c in ("frontal", "lateral", "ecg"))
    assert os.path.isfile(os.path.join(ds.builder.data_dir, mb.SKIPPED_FILE))
    with open(os.path.join(ds.builder.data_dir, mb.SKIPPED_FILE)) as f:
        assert list(csv.reader(f)) == [["row", "id", "column", "file", "reason"]]
    assert isinstance(ds.builder.info, LocalDatasetInfo)  # no empty /tmp folder per builder (test_pipeline)


def test_train_batches_follow_the_contract(ds):
    it = iter(pipeline.train_loader(ds.builder, ds.spec, 8, seed=0, shard_index=0, shard_count=1))
    for _ in range(2):
        batch = next(it)
        validate_batch(batch, ds.spec.tasks, ds.spec.modalities)
        assert batch["frontal"]["values"].shape == (8, 16, 16, 1)
        assert batch["lateral"]["values"].shape == (8, 16, 16, 3)
        assert batch["ecg"]["values"].shape == (8, LENGTH, 2)
        assert batch["labs"]["values"].shape == (8, 2) and batch["labs"]["categories"].shape == (8, 2)
        assert set(batch["labels"]) == {"died", "dx", "findings", "los"}


def test_presence_follows_empty_cells(ds, evaluated):
    rows = {r["pid"]: r for r in ds.rows}
    seen = 0
    for split, by_id in evaluated.items():
        assert len(by_id) == ds.spec.split_sizes[split]
        for pid, ex in by_id.items():
            r = rows[pid]
            for name, column in (("frontal", "frontal"), ("lateral", "lateral"), ("note", "note"), ("ecg", "ecg")):
                assert bool(ex[name]["present"]) == bool(r[column]), (pid, name)
                if not r[column]:
                    seen += 1
                    assert not np.any(ex[name]["values"]), (pid, name)
                    if "mask" in ex[name]:
                        assert not ex[name]["mask"].any()
            labs_given = any(r[c] for c in ("age", "crp", "sex", "site"))
            assert bool(ex["labs"]["present"]) == labs_given, pid
            np.testing.assert_array_equal(ex["labs"]["mask"], [bool(r["age"]), bool(r["crp"])])
            assert not np.any(ex["labs"]["values"][~ex["labs"]["mask"]])
            if not r["sex"]:
                assert ex["labs"]["categories"][0] == 0
    assert seen == 8  # every empty image/text/signal cell was checked


def test_labels_and_label_masks(ds, evaluated):
    rows = {r["pid"]: r for r in ds.rows}
    dx = {t.name: t for t in ds.spec.tasks}["dx"]
    assert dx.label_names == ("asthma", "copd", "normal")  # classes from the training rows
    findings = ("effusion", "edema", "nodule")
    for by_id in evaluated.values():
        for pid, ex in by_id.items():
            r, y, known = rows[pid], ex["labels"], ex["label_mask"]
            assert bool(known["died"]) == bool(r["died"])
            if r["died"]:
                assert y["died"] == (1.0 if r["died"] == "yes" else 0.0)
            assert bool(known["dx"]) == bool(r["dx"])
            if r["dx"]:
                assert dx.label_names[int(y["dx"])] == r["dx"]
            assert known["findings"].all() == bool(r["findings"]) and known["findings"].any() == bool(r["findings"])
            if r["findings"]:
                items = {s.strip() for s in r["findings"].split(";")}
                np.testing.assert_array_equal(y["findings"], [float(c in items) for c in findings])
            assert bool(known["los"]) == bool(r["los"])
            if r["los"]:
                assert y["los"] == np.float32(r["los"])
            else:
                assert y["los"] == 0


def test_text_from_a_txt_file_is_what_gets_tokenized(ds, evaluated):
    tok = WordPieceTokenizer(ds.spec.modality("note").vocab)
    inline = " ".join(r["note"] for r in ds.rows).lower()
    assert "xylophone" not in inline and "quokka" not in inline
    ex = evaluated["train"]["p002"]
    text = tok.decode(ex["note"]["values"][ex["note"]["mask"]])
    assert "xylophone" in text and "density" in text
    assert "txt" not in text and "notes" not in text  # not the path
    assert "quokka" in tok.decode(evaluated["train"]["p008"]["note"]["values"])
    assert "xylophone" not in tok.decode(evaluated["train"]["p008"]["note"]["values"])


def test_images_png_exact_and_dicom_not_constant(ds, evaluated):
    raw = _raw(ds.builder, "train")
    for i in (1, 2, 7):
        np.testing.assert_array_equal(raw[i]["modalities"]["frontal"][..., 0], ds.images[i])
    dcm = raw[0]["modalities"]["frontal"]
    assert dcm.shape == (16, 16, 1) and dcm.std() > 5
    dcm2 = _raw(ds.builder, "test")[23]["modalities"]["frontal"]
    assert dcm2.shape == (16, 16, 1) and dcm2.std() > 5
    assert raw[1]["modalities"]["lateral"].shape == (16, 16, 3)
    values = evaluated["train"]["p000"]["frontal"]["values"]
    assert values.std() > 0.1  # standardized DICOM pixels: not constant after the pipeline either


def test_signals_come_through_with_their_values(ds):
    raw = {}
    for split in ("train", "validation", "test"):
        raw.update(_raw(ds.builder, split))
    formats = set()
    for i, expected in ds.signals.items():
        got = raw[i]["modalities"]["ecg"]
        cell = ds.rows[i]["ecg"]
        formats.add(os.path.splitext(cell)[1] or "bare wfdb")
        assert got.shape == expected.shape, (i, cell)
        wfdb = cell.endswith(".hea") or i == BARE_WFDB_ROW
        np.testing.assert_allclose(got, expected, atol=1e-3 if wfdb else 1e-5, err_msg=cell)
    assert formats == {".wav", ".npy", ".csv", ".mat", ".hea", "bare wfdb"}
    for i in (14, 19):
        assert raw[i]["modalities"]["ecg"].shape == (0, 2)


def test_short_signal_padded_long_one_centre_cropped(ds, evaluated):
    short = evaluated[_split(SHORT_ROW)][f"p{SHORT_ROW:03d}"]["ecg"]
    n = LENGTH // 2
    assert short["mask"][:n].all() and not short["mask"][n:].any()
    assert not short["values"][n:].any()
    np.testing.assert_allclose(short["values"][:n], _standardize(ds.signals[SHORT_ROW]), atol=1e-4)
    long = evaluated[_split(LONG_ROW)][f"p{LONG_ROW:03d}"]["ecg"]
    assert long["mask"].all() and long["values"].shape == (LENGTH, 2)
    start = (2 * LENGTH - LENGTH) // 2
    np.testing.assert_allclose(long["values"], _standardize(ds.signals[LONG_ROW][start:start + LENGTH]), atol=1e-4)
    wfdb = evaluated[_split(4)]["p004"]["ecg"]  # an ordinary WFDB row through the pipeline's standardization
    np.testing.assert_allclose(wfdb["values"][:, 0], _standardize(ds.signals[4])[:, 0], atol=1e-3)


# ------------------------------------------------------------------------------ 2. statistics from training


def test_statistics_are_fitted_on_training_rows_only(ds, evaluated):
    train = [r for r in ds.rows if r["split"] == "train"]
    num = lambda rs, c: np.array([float(r[c]) if r[c] else np.nan for r in rs])
    age, crp = num(train, "age"), num(train, "crp")
    labs = ds.spec.modality("labs")
    np.testing.assert_allclose(labs.mean, [np.nanmean(age), np.nanmean(np.log(crp))], rtol=1e-6)
    np.testing.assert_allclose(labs.std, [np.nanstd(age), np.nanstd(np.log(crp))], rtol=1e-6)
    everything = np.log(num(ds.rows, "crp"))
    assert not np.isclose(labs.mean[1], np.nanmean(everything))  # the other splits would change it
    assert labs.log_scale == (False, True)
    assert labs.categories == (("F", "M"), ("A", "B", "C"))  # 'D' is only in test rows
    # a standardized value equals (log(x) - mean) / std
    ex, r = evaluated["test"]["p005"], ds.rows[5]
    assert ex["labs"]["mask"].tolist() == [True, False]
    np.testing.assert_allclose(ex["labs"]["values"][0], (float(r["age"]) - labs.mean[0]) / labs.std[0], rtol=1e-5)
    r4 = ds.rows[4]
    np.testing.assert_allclose(evaluated["validation"]["p004"]["labs"]["values"][1],
                               (np.log(float(r4["crp"])) - labs.mean[1]) / labs.std[1], rtol=1e-5)
    los = {t.name: t for t in ds.spec.tasks}["los"]
    assert los.target_mean == pytest.approx(np.mean([float(r["los"]) for r in train if r["los"]]), rel=1e-6)


def test_unseen_category_is_index_1_and_counted(ds, evaluated):
    for pid in ("p011", "p023"):
        assert evaluated["test"][pid]["labs"]["categories"][1] == 1
    assert evaluated["test"]["p005"]["labs"]["categories"][1] == 2 + "ABC".index(ds.rows[5]["site"])
    assert evaluated["train"]["p012"]["labs"]["categories"].tolist() == [0, 0]
    unseen = ds.builder.info.metadata["summary"]["unseen_categories"]["labs"]
    assert unseen["site"] == {"validation": 0, "test": 2}
    assert unseen["sex"] == {"validation": 0, "test": 0}


# ------------------------------------------------------------------------------------------- 3. bad inputs

SMALL_SCHEMA = {
    "name": "small", "id": "pid", "split": "split",
    "modalities": {
        "img": {"kind": "image", "column": "img", "size": 8, "channels": 1},
        "sig": {"kind": "signal", "column": "sig", "rate": RATE, "seconds": 1, "channels": 2},
        "labs": {"kind": "tabular", "numeric": ["a", "b"], "categorical": ["c"], "log": ["b"]},
    },
    "tasks": {
        "dx": {"kind": "multiclass", "column": "dx", "classes": ["x", "y"]},
        "dead": {"kind": "binary", "column": "dead"},
    },
}


def _small(folder: pathlib.Path, n=5, schema=None, edit=None):
    """A tiny valid manifest (n rows) with PNGs and NPYs; `edit(rows, folder)` breaks some of it."""
    (folder / "f").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(np.full((8, 8), 20 * i + 10, np.uint8), "L").save(folder / "f" / f"i{i}.png")
        np.save(folder / "f" / f"s{i}.npy", _signal(i, RATE))
        rows.append({"pid": f"p{i}", "split": "test" if i == n - 1 else "train", "img": f"f/i{i}.png",
                     "sig": f"f/s{i}.npy", "a": str(i + 0.5), "b": str(i + 1), "c": "uv"[i % 2], "dx": "xy"[i % 2],
                     "dead": "yes" if i % 2 else "no"})
    if edit:
        edit(rows, folder)
    manifest = _write_csv(folder / "manifest.csv", rows)
    return manifest, _write_schema(folder / "schema.yaml", schema or SMALL_SCHEMA)


def _set(column, value, row=2):
    def edit(rows, folder):
        rows[row][column] = value
    return edit


def _corrupt_png(rows, folder):
    (folder / "f" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    rows[2]["img"] = "f/bad.png"


def _corrupt_npy(rows, folder):
    (folder / "f" / "bad.npy").write_bytes(b"\x93NUMPY garbage" * 8)
    rows[2]["sig"] = "f/bad.npy"


def _three_channels(rows, folder):
    np.save(folder / "f" / "three.npy", np.zeros((RATE, 3), np.float32))
    rows[2]["sig"] = "f/three.npy"


def _dicom(folder, name, **changes):
    """CT_small.dcm with `changes`, saved as f/<name>; the manifest cell naming it."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(folder / "f" / name)
    return f"f/{name}"


def _nan_slope(rows, folder):  # every pixel NaN after the modality LUT: was an all-black image
    rows[2]["img"] = _dicom(folder, "nan.dcm", RescaleSlope="NaN")


def _huge_dicom(rows, folder):  # the header promises 2**28 + 2**14 pixels (over the default cap), the file has 32 KB
    rows[2]["img"] = _dicom(folder, "huge.dcm", Rows=2**14 + 1, Columns=2**14)


def _outside(folder) -> pathlib.Path:
    """A PNG beside the manifest's folder: outside the default allowed root."""
    path = folder.parent / f"{folder.name}-outside.png"
    Image.fromarray(np.full((8, 8), 99, np.uint8), "L").save(path)
    return path


def _dot_dot(rows, folder):
    rows[2]["img"] = f"../{_outside(folder).name}"


def _absolute(rows, folder):
    rows[2]["img"] = str(_outside(folder))


def _symlink_out(rows, folder):
    (folder / "f" / "link.png").symlink_to(_outside(folder))
    rows[2]["img"] = "f/link.png"


BAD_CELLS = {  # case: (edit, column, reason pattern); every case breaks row 3 (id 'p2')
    "missing file": (_set("img", "f/nowhere.png"), "img", r"file .*nowhere\.png: file not found"),
    "undecodable image": (_corrupt_png, "img", r"file .*bad\.png: cannot decode image"),
    "undecodable signal": (_corrupt_npy, "sig", r"file .*bad\.npy: cannot read signal"),
    "wrong channels": (_three_channels, "sig", r"has 3 channels, expected 2"),
    "NaN": (_set("a", "nan"), "a", r"'nan' is not a number"),
    "not a number": (_set("a", "12,5"), "a", r"'12,5' is not a number"),
    "log of zero": (_set("b", "0"), "b", r"0\.0 is <= 0 but the column is log-scaled"),
    "log of negative": (_set("b", "-3"), "b", r"-3\.0 is <= 0 but the column is log-scaled"),
    "undeclared class": (_set("dx", "z"), "dx", r"label 'z' is not among the classes \['x', 'y'\]"),
    "binary maybe": (_set("dead", "maybe"), "dead", r"label 'maybe' is not 0/1"),
    "unknown split": (_set("split", "holdout"), "split", r"split 'holdout' is not one of"),
    "NaN rescale slope": (_nan_slope, "img", r"file .*nan\.dcm: non-finite pixel values"),
    "too many pixels": (_huge_dicom, "img", r"file .*huge\.dcm: 268451840 pixels .*max_pixels=268435456"),
    "path with ..": (_dot_dot, "img", r"-outside\.png: outside the allowed folders"),
    "absolute path": (_absolute, "img", r"-outside\.png: outside the allowed folders"),
    "symlink out": (_symlink_out, "img", r"file .*link\.png: outside the allowed folders"),
}


@pytest.mark.parametrize("case", list(BAD_CELLS))
def test_bad_cell_is_an_error_naming_row_column_and_reason(tmp_path, case):
    edit, column, reason = BAD_CELLS[case]
    manifest, schema = _small(tmp_path, edit=edit)
    with pytest.raises(DataError, match=rf"row 3 \(id 'p2'\), column '{column}'.*{reason}"):
        mb.load(manifest, schema, str(tmp_path / "tfds"), workers=1, log=lambda s: None)


def test_label_messages_quote_the_cell():
    df = pd.DataFrame({"x": ["1", "maybe", ""], "y": ["0", "1", "no"], "dx": ["a", "b", "c"]})
    train = np.array([True, True, False])
    y, known, classes, bad = table.parse_labels(df, "f", {"kind": "multilabel", "columns": ["x", "y"],
                                                          "unknown_values": []}, train)
    assert bad == [(1, "x", "label 'maybe' is not 0/1, true/false, yes/no")]
    np.testing.assert_array_equal(known, [[True, True], [False, True], [False, True]])
    np.testing.assert_array_equal(y[known], [1, 0, 1, 0])
    _, _, classes, bad = table.parse_labels(df, "dx", {"kind": "multiclass", "column": "dx", "unknown_values": []},
                                            train)
    assert classes == ["a", "b"] and all(type(c) is str for c in classes)  # from the training rows only
    assert bad == [(2, "dx", "label 'c' is not among the classes ['a', 'b']")]


def test_schema_and_table_errors(tmp_path):
    def bad_schema(change):
        s = json.loads(json.dumps(SMALL_SCHEMA))
        change(s)
        return s

    cases = [
        (bad_schema(lambda s: s["modalities"]["img"].update(colour="red")), r"modality 'img'.*unknown key.*'colour'"),
        (bad_schema(lambda s: s.update(owner="me")), r"unknown key.*'owner'"),
        (bad_schema(lambda s: s["tasks"]["dx"].update(column="ghost")), r"missing column.*\['ghost'\]"),
    ]
    for k, (schema, pattern) in enumerate(cases):
        manifest, schema_path = _small(tmp_path / str(k), n=3, schema=schema)
        with pytest.raises(DataError, match=pattern):
            mb.load(manifest, schema_path, str(tmp_path / "tfds"), workers=1, log=lambda s: None)

    def two_splits(rows, folder):
        rows[3]["pid"] = "p1"  # p1 is in train (row 2) and test (row 4)
    manifest, schema = _small(tmp_path / "dup", n=4, edit=two_splits)
    for on_error in ("strict", "skip"):  # not a row problem: even skip stops
        with pytest.raises(DataError, match=r"id 'p1' is in two splits"):
            mb.load(manifest, schema, str(tmp_path / "tfds"), on_error=on_error, workers=1, log=lambda s: None)


def _many_bad(rows, folder):
    _set("img", "f/nowhere.png", row=1)(rows, folder)
    _corrupt_npy(rows, folder)  # row 3
    _set("b", "-1", row=4)(rows, folder)
    _set("dead", "maybe", row=5)(rows, folder)
    _set("dx", "z", row=5)(rows, folder)  # a second problem in the same row: still one row left out
    _set("split", "later", row=6)(rows, folder)


@pytest.mark.parametrize("via", ["schema", "load"])
def test_skip_leaves_out_bad_rows_and_lists_them(tmp_path, via):
    schema = dict(SMALL_SCHEMA, on_error="skip") if via == "schema" else None
    manifest, schema_path = _small(tmp_path, n=10, schema=schema, edit=_many_bad)
    messages = []
    b = mb.load(manifest, schema_path, str(tmp_path / "tfds"), on_error="skip" if via == "load" else None,
                workers=1, log=messages.append)
    kept = {pid for split in b.info.splits for pid in _ids(b, split)}
    assert sum(b.info.splits[s].num_examples for s in b.info.splits) == 10 - 5
    assert kept == {"p0", "p3", "p7", "p8", "p9"}
    with open(os.path.join(b.data_dir, mb.SKIPPED_FILE)) as f:
        listed = list(csv.DictReader(f))
    got = [(int(r["row"]), r["column"], os.path.basename(r["file"])) for r in listed]
    assert got == [(2, "img", "nowhere.png"), (3, "sig", "bad.npy"), (5, "b", ""), (6, "dx", ""), (6, "dead", ""),
                   (7, "split", "")]
    reasons = {(int(r["row"]), r["column"]): r["reason"] for r in listed}
    assert reasons[(2, "img")] == "file not found" and "<= 0" in reasons[(5, "b")]
    assert "maybe" in reasons[(6, "dead")] and "later" in reasons[(7, "split")]
    assert any("Skipped 5 row(s)" in m for m in messages)


NOTE_SCHEMA = {"name": "notes", "id": "pid", "split": "split",
               "modalities": {"note": {"kind": "text", "column": "note"}},
               "tasks": {"dead": {"kind": "binary", "column": "dead"}}}


def _note_rows(notes, ids=None):
    """One row per note, the last one in test; `ids` (default p0, p1, ...) may repeat a patient."""
    ids = ids or [f"p{i}" for i in range(len(notes))]
    return [{"pid": pid, "split": "test" if i == len(notes) - 1 else "train", "note": note, "dead": str(i % 2)}
            for i, (pid, note) in enumerate(zip(ids, notes))]


def test_a_note_ending_in_txt_is_text_and_never_printed(tmp_path):
    notes = ["fever and cough", "Seen with Mrs Quimby, see discharge.txt", "cough", "wheeze"]
    rows = _note_rows(notes)
    rows[2]["dead"] = "maybe"  # a bad row, so skipped_rows.csv lists something
    manifest = _write_csv(tmp_path / "m.csv", rows)
    schema = _write_schema(tmp_path / "s.yaml", dict(NOTE_SCHEMA, on_error="skip"))
    b = mb.load(manifest, schema, str(tmp_path / "tfds"), workers=1, log=lambda s: None)
    assert _ids(b, "train") == ["p0", "p1"]
    assert _text(_raw(b, "train")[1]["modalities"]["note"]) == notes[1]  # the note itself, not a missing file
    skipped = pathlib.Path(b.data_dir, mb.SKIPPED_FILE).read_text()
    assert "p2" in skipped and "Quimby" not in skipped


def test_text_paths_are_confined_and_can_be_declared(tmp_path):
    folder = tmp_path / "study"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "n1.txt").write_text("cough since monday\n")
    (tmp_path / "secret.txt").write_text("hemlock\n")  # outside the manifest's folder
    manifest = _write_csv(folder / "m.csv", _note_rows(["fever", "notes/n1.txt", "../secret.txt", "cough"]))
    schema = _write_schema(folder / "s.yaml", NOTE_SCHEMA)
    with pytest.raises(DataError, match=r"row 3 \(id 'p2'\), column 'note', file .*secret\.txt: outside the allowed"):
        mb.load(manifest, schema, str(tmp_path / "tfds"), workers=1, log=lambda s: None)
    # `file: true`: every cell names a file, so a missing one is a bad row (not a one-line note)
    declared = json.loads(json.dumps(NOTE_SCHEMA))
    declared["modalities"]["note"]["file"] = True
    manifest = _write_csv(folder / "m.csv", _note_rows(["notes/n1.txt", "notes/n1.txt", "notes/gone.txt", "x.txt"]))
    schema = _write_schema(folder / "s.yaml", declared)
    with pytest.raises(DataError, match=r"row 3 \(id 'p2'\), column 'note', file .*gone\.txt: file not found"):
        mb.load(manifest, schema, str(tmp_path / "tfds"), workers=1, log=lambda s: None)


def test_allowed_roots_and_caps_come_from_the_config(tmp_path):
    from experiments.common import manifest_config
    from mmjax.data import sources

    manifest, schema = _small(tmp_path / "study", n=4, edit=_absolute)  # row 3's image is outside study/
    c = manifest_config(manifest=manifest, schema=schema)
    assert (c.data.allowed_roots, c.data.max_pixels, c.data.text_min_patients) == (
        "", mb.DEFAULT_MAX_PIXELS, mb.DEFAULT_TEXT_MIN_PATIENTS)
    c.data.update(data_dir=str(tmp_path / "tfds"), prepare_workers=1)
    with pytest.raises(DataError, match=r"row 3 \(id 'p2'\), column 'img', .*outside the allowed folders"):
        sources.builder_from_config(c.data)
    c.data.allowed_roots = f"{tmp_path / 'study'}, {tmp_path}"
    b = sources.builder_from_config(c.data)
    assert sum(b.info.splits[s].num_examples for s in b.info.splits) == 4
    with open(os.path.join(b.data_dir, mb.INPUTS_FILE)) as f:
        inputs = json.load(f)
    assert inputs["allowed_roots"] == [os.path.realpath(tmp_path / "study"), os.path.realpath(tmp_path)]
    assert (inputs["max_pixels"], inputs["text_min_patients"]) == (mb.DEFAULT_MAX_PIXELS, 5)
    assert mb.changes(inputs, {**inputs, "max_pixels": 0}) == [f"max_pixels changed ({mb.DEFAULT_MAX_PIXELS} -> 0)"]
    with pytest.raises(DataError, match=r"allowed_roots: .*nowhere: no such folder"):
        mb.parse_roots(f"{tmp_path},{tmp_path / 'nowhere'}", manifest)


def test_duplicate_column_header_is_an_error_naming_it(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("pid,age,sex,age\np0,40,F,41\n")  # pandas alone would rename the second to 'age.1'
    with pytest.raises(DataError, match=r"m\.csv: column 'age' appears 2 times in the header"):
        table.read_table(str(path))


def test_vocabulary_keeps_words_of_at_least_5_patients(tmp_path):
    """A word enters the vocabulary only if the notes of 5 distinct patients use it, however often."""
    notes = [f"fever {w}" for w in ["quimby"] * 4 + ["wheeze"] * 5 + ["zebedee"] * 6] + ["cough"]
    ids = [f"a{k}" for k in range(4)] + [f"b{k}" for k in range(5)] + [f"c{k // 2}" for k in range(6)] + ["d"]
    manifest = _write_csv(tmp_path / "m.csv", _note_rows(notes, ids))
    schema = _write_schema(tmp_path / "s.yaml", NOTE_SCHEMA)
    b = mb.load(manifest, schema, str(tmp_path / "tfds"), workers=1, log=lambda s: None)
    spec = DatasetSpec.from_builder(b)
    vocab = spec.modality("note").vocab
    assert "wheeze" in vocab and "fever" in vocab
    assert "zebedee" not in vocab  # 6 notes, 3 patients
    stored = json.dumps(spec.to_metadata()) + json.dumps(dict(b.info.metadata))
    assert "quimby" not in stored and "zebedee" not in stored
    # without patients (the synthetic dataset: one note per simulated patient) min_count alone decides, as before
    assert "quimby" in WordPieceTokenizer.fit(["quimby quimby", "quimby"]).vocab


def test_new_patients_schema_must_match_the_run(tmp_path):
    """predict reads new patients with the run's schema: a modality of the run it lacks, a task of
    another kind or a task the run does not have are errors naming the schema key."""
    from mmjax.data.manifest.prepare import example, prepare_new
    from mmjax.data.manifest.schema import load_schema

    manifest, schema_path = _small(tmp_path, n=4)
    (tmp_path / "cache").mkdir()
    spec = DatasetSpec.from_builder(mb.load(manifest, schema_path, str(tmp_path / "tfds"), workers=1,
                                            log=lambda s: None))

    def new_patients(change, modalities=None):
        s = json.loads(json.dumps(SMALL_SCHEMA))
        change(s)
        schema = load_schema(_write_schema(tmp_path / "new.yaml", s), manifest)
        prepared = prepare_new(manifest, schema, spec, str(tmp_path / "cache"), modalities=modalities, workers=1,
                               log=lambda s: None)
        return [example(r, spec) for r in prepared.rows]

    for change, pattern in [
        (lambda s: s["modalities"].pop("labs"), r"new\.yaml: lacks the run's modality 'labs' \(modalities\.labs\)"),
        (lambda s: s["tasks"]["dead"].update(kind="regression"),
         r"new\.yaml: task 'dead' is regression \(tasks\.dead\.kind\) but the run's is binary"),
        (lambda s: s["tasks"].update(again={"kind": "binary", "column": "dead"}),
         r"new\.yaml: task 'again' \(tasks\.again\) is not one of the run's tasks \['dx', 'dead'\]"),
    ]:
        with pytest.raises(DataError, match=pattern):
            new_patients(change)
    # a modality of the dataset that the run does not use may be left out: read as absent
    examples = new_patients(lambda s: s["modalities"].pop("sig"), modalities=("img", "labs"))
    assert len(examples) == 4 and not any(e["present"]["sig"] for e in examples)


# ---------------------------------------------------------------------------------- 4. splits without a column

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _split_schema(split=None):
    return Schema(path="schema.yaml", name="t", id="pid", split=split, on_error="strict", modalities={}, tasks={})


def _by_id(ids, splits):
    out = {}
    for pid, s in zip(ids, splits):
        out.setdefault(pid, set()).add(s)
    assert all(len(v) == 1 for v in out.values()), "an id in two splits"
    return {pid: v.pop() for pid, v in out.items()}


def test_hash_splits_are_deterministic_grouped_and_proportional():
    ids = [f"patient-{k}" for k in range(200) for _ in range(1 + k % 3)]  # 1-3 rows per id
    df = pd.DataFrame({"pid": ids})
    splits, bad = table.assign_splits(df, _split_schema(), FRACTIONS, 0, 0, "m.csv")
    assert not bad and set(splits) == {"train", "validation", "test"}
    again, _ = table.assign_splits(df, _split_schema(), FRACTIONS, 0, 0, "m.csv")
    assert again == splits
    shuffled = df.sample(frac=1.0, random_state=0)
    other, _ = table.assign_splits(shuffled, _split_schema(), FRACTIONS, 0, 0, "m.csv")
    assert _by_id(shuffled["pid"], other) == _by_id(ids, splits)  # by id, not by row position
    share = pd.Series(_by_id(ids, splits)).value_counts() / 200
    assert abs(share["train"] - 0.8) < 0.08 and abs(share["validation"] - 0.1) < 0.06
    assert abs(share["test"] - 0.1) < 0.06
    half, _ = table.assign_splits(df, _split_schema(), {"train": 0.5, "validation": 0.0, "test": 0.5}, 0, 0, "m")
    share = pd.Series(_by_id(ids, half)).value_counts() / 200
    assert "validation" not in share and abs(share["train"] - 0.5) < 0.1


def test_k_fold_test_sets_partition_the_ids():
    ids = [f"patient-{k}" for k in range(200) for _ in range(1 + k % 2)]
    df = pd.DataFrame({"pid": ids})
    tests = []
    for fold in range(5):
        splits, _ = table.assign_splits(df, _split_schema(), FRACTIONS, 5, fold, "m.csv")
        per_id = _by_id(ids, splits)  # train / validation / test never share an id within a fold
        test = {p for p, s in per_id.items() if s == "test"}
        assert len(test) == 40 and any(s == "validation" for s in per_id.values())
        tests.append(test)
    assert set().union(*tests) == set(ids)
    assert sum(len(t) for t in tests) == 200  # disjoint: every id in exactly one test set
    with pytest.raises(DataError, match="fold=5"):
        table.assign_splits(df, _split_schema(), FRACTIONS, 5, 5, "m.csv")
    # with a split column, its test rows stay test and fold k of the others is validation
    df["split"] = ["test" if int(p.split("-")[1]) % 4 == 0 else "train" for p in ids]
    vals = []
    for fold in range(5):
        splits, _ = table.assign_splits(df, _split_schema("split"), FRACTIONS, 5, fold, "m.csv")
        assert [s == "test" for s in splits] == (df["split"] == "test").tolist()
        vals.append({p for p, s in zip(ids, splits) if s == "validation"})
    assert set().union(*vals) == set(df.loc[df["split"] != "test", "pid"]) and sum(map(len, vals)) == 150


def test_k_fold_end_to_end(tmp_path):
    schema = {"id": "pid", "modalities": {"labs": {"kind": "tabular", "numeric": ["a"]}},
              "tasks": {"dead": {"kind": "binary", "column": "dead"}}}
    rows = [{"pid": f"q{k}", "a": str(k + 0.5 * j), "dead": str((k + j) % 2)} for k in range(30) for j in range(2)]
    manifest = _write_csv(tmp_path / "m.csv", rows)
    schema_path = _write_schema(tmp_path / "s.yaml", schema)
    tests = []
    for fold in (0, 1):
        b = mb.load(manifest, schema_path, str(tmp_path / "tfds"), folds=5, fold=fold, workers=1, log=lambda s: None)
        assert re.search(rf"/manifest/{tmp_path.name}_fold{fold}of5-[0-9a-f]{{{mb.KEY_LENGTH}}}/1\.0\.0$", b.data_dir)
        ids = {s: _ids(b, s) for s in b.info.splits}
        assert sum(map(len, ids.values())) == 60
        sets = [set(v) for v in ids.values()]
        assert sum(map(len, sets)) == 30  # no id in two splits
        expected, _ = table.assign_splits(pd.DataFrame(rows), _split_schema(), FRACTIONS, 5, fold, "m")
        assert set(ids["test"]) == {r["pid"] for r, s in zip(rows, expected) if s == "test"}
        assert len(set(ids["test"])) == 6
        tests.append(set(ids["test"]))
    assert not tests[0] & tests[1]


# ------------------------------------------------------------------------------------------ 5. reuse, rebuild


def test_reuse_and_rebuild_with_a_reason(tmp_path):
    import wfdb

    def bare_record(rows, folder):
        wfdb.wrsamp("rec", fs=RATE, units=["mV", "mV"], sig_name=["I", "II"], p_signal=_signal(9, RATE).astype(float),
                    fmt=["16", "16"], write_dir=str(folder / "f"))
        rows[0]["sig"] = "f/rec"  # a WFDB record named without extension

    manifest, schema = _small(tmp_path, n=4, edit=bare_record)
    data_dir = str(tmp_path / "tfds")

    def load():
        messages = []
        b = mb.load(manifest, schema, data_dir, workers=1, log=messages.append)
        return b, " | ".join(messages)

    first, said = load()
    assert said.startswith("Preparing ")
    again, said = load()
    assert said == "" and again.data_dir == first.data_dir  # nothing changed: reused, not rebuilt

    new = np.full((8, 8), 222, np.uint8)
    Image.fromarray(new, "L").save(tmp_path / "f" / "i1.png")
    os.utime(tmp_path / "f" / "i1.png", ns=(1_000_000_000, 1_000_000_000))
    b, said = load()
    assert "Rebuilding" in said and "referenced file" in said and "i1.png" in said, said
    assert b.data_dir == first.data_dir
    np.testing.assert_array_equal(_raw(b, "train")[1]["modalities"]["img"][..., 0], new)  # the new pixels
    assert load()[1] == ""

    rec = np.load(tmp_path / "f" / "s2.npy")  # the data file of the bare WFDB record is tracked too
    wfdb.wrsamp("rec", fs=RATE, units=["mV", "mV"], sig_name=["I", "II"], p_signal=rec.astype(float) * 3,
                fmt=["16", "16"], write_dir=str(tmp_path / "f"))
    _, said = load()
    assert "Rebuilding" in said and "referenced file" in said and "rec.dat" in said, said

    # an edited manifest or schema is another dataset: prepared in its own folder, the first one kept as it was
    stamp = os.path.join(first.data_dir, mb.INPUTS_FILE)
    before = pathlib.Path(stamp).read_text()
    text = pathlib.Path(manifest).read_text().replace("0.5,1,u", "0.75,1,u")
    assert text != pathlib.Path(manifest).read_text()
    pathlib.Path(manifest).write_text(text)
    edited, said = load()
    assert said.startswith("Preparing ") and "Rebuilding" not in said, said
    with open(schema, "a") as f:
        f.write("# edited\n")
    both, said = load()
    assert said.startswith("Preparing ") and "Rebuilding" not in said, said
    assert len({first.data_dir, edited.data_dir, both.data_dir}) == 3
    assert pathlib.Path(stamp).read_text() == before
    assert load()[1] == ""


def test_other_split_settings_live_beside_and_never_rebuild_each_other(tmp_path):
    """The reproduction: run B on run A's manifest with other split fractions rebuilt A's folder in
    place, and A's next evaluation read a test split holding one of A's training patients."""
    schema = _write_schema(tmp_path / "s.yaml", {"id": "pid", "modalities": {"labs": {"kind": "tabular",
                                                                                     "numeric": ["a"]}},
                                                "tasks": {"dead": {"kind": "binary", "column": "dead"}}})
    manifest = _write_csv(tmp_path / "m.csv", [{"pid": f"q{k}", "a": str(k), "dead": str(k % 2)} for k in range(40)])
    data_dir = str(tmp_path / "tfds")
    a = mb.load(manifest, schema, data_dir, workers=1, log=lambda s: None)
    a_test = _ids(a, "test")
    messages = []
    b = mb.load(manifest, schema, data_dir, fractions={"train": 0.5, "validation": 0.25, "test": 0.25}, workers=1,
                log=messages.append)
    assert b.data_dir != a.data_dir and not any("Rebuilding" in m for m in messages), messages
    again = mb.load(manifest, schema, data_dir, workers=1, log=messages.append)
    assert again.data_dir == a.data_dir and _ids(again, "test") == a_test
    assert sum(m.startswith("Prepar") for m in messages) == 2  # B's preparation; A's read back, not rebuilt


def test_a_killed_preparation_leaves_nothing_behind_and_preparations_wait_for_each_other(tmp_path):
    manifest, schema = _small(tmp_path, n=8)
    data_dir = str(tmp_path / "tfds")
    # two processes prepare the same dataset at once: one prepares, the other waits on the lock and reuses it
    # (before the lock the second failed inside TFDS with FileExistsError)
    cmd = [sys.executable, "-m", "mmjax.data.manifest", f"--manifest={manifest}", f"--schema={schema}",
           f"--data_dir={data_dir}", "--workers=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(out.count("Preparing manifest/") for out, _ in outs) == 1, outs
    # a preparation killed while decoding or writing leaves TFDS's incomplete.* and mmjax's .decoded-* folders
    # (decoded images: patient data); the next preparation of that dataset removes them
    b = mb.load(manifest, schema, data_dir, workers=1, log=lambda s: None)
    folder = pathlib.Path(b.data_dir).parent
    for name in ("incomplete.AB12CD_1.0.0", ".decoded-x1y2"):
        (folder / name).mkdir()
        (folder / name / "p0.npy").write_bytes(b"pixels")
    mb.load(manifest, schema, data_dir, workers=1, log=lambda s: None)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "1.0.0"]


# ---------------------------------------------------------------------------------- 6. other manifest formats


def test_jsonl_tsv_parquet_give_the_same_examples(ds, tmp_path):
    rows = ds.rows[:24]
    df = pd.DataFrame(rows)
    typed = df.replace("", None)
    for c in ("age", "crp", "los"):
        typed[c] = pd.to_numeric(typed[c])  # numbers as numbers, empty cells as null
    paths = {"csv": _write_csv(ds.folder / "sub.csv", rows), "tsv": str(ds.folder / "sub.tsv"),
             "jsonl": str(ds.folder / "sub.jsonl"), "parquet": str(ds.folder / "sub.parquet")}
    df.to_csv(paths["tsv"], sep="\t", index=False)
    typed.to_json(paths["jsonl"], orient="records", lines=True)
    typed.to_parquet(paths["parquet"])
    jsonl = pathlib.Path(paths["jsonl"]).read_text()
    assert re.search(r'"age":\d', jsonl) and '"crp":null' in jsonl  # unquoted numbers, nulls
    examples = {}
    for fmt, path in paths.items():
        b = mb.load(path, ds.schema, str(tmp_path / fmt), workers=1, log=lambda s: None)
        examples[fmt] = {split: _raw(b, split) for split in ("train", "validation", "test")}
    assert len(examples["csv"]["train"]) == 16

    def same(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], f"{where}/{k}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)

    for fmt in ("tsv", "jsonl", "parquet"):
        same(examples[fmt], examples["csv"], fmt)


# --------------------------------------------------------------------------------------------------- 7. CLI


def test_cli_prints_the_summary(ds, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmjax.data.manifest", f"--manifest={ds.manifest}",
                          f"--schema={ds.schema}", f"--data_dir={tmp_path}"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    train = [r for r in ds.rows if r["split"] == "train"]
    died = [r["died"] for r in train if r["died"]]
    frontal = sum(bool(r["frontal"]) for r in train) / len(train)
    for expected in ("Preparing manifest/allkinds", f"allkinds in {tmp_path}/manifest/allkinds-",
                     ": 48 rows, 48 kept, 0 skipped",
                     "[train] 32 examples", "[validation] 8 examples", "[test] 8 examples",
                     f"  present: frontal {frontal:.1%}  lateral ",
                     f"  died: known {len(died)}, positive {died.count('yes')}",
                     "ecg (signal, 100 steps at 50 Hz, channels 2)",
                     "unseen categories of labs.site (not in training; embedded as 'unseen'): validation 0, test 2"):
        assert expected in text, (expected, text)
    # TFDS's INFO lines ("Generating dataset ...") stay off the console of a command without a workdir
    assert not re.search(r"^I\d{4} ", out.stderr, re.M), out.stderr


# ----------------------------------------------------------------------------------------- 8. training run


def test_smoke_training_run_on_the_manifest(ds, tmp_path, recomputed):
    from mmjax.training.train import train_and_evaluate

    spec = importlib.util.spec_from_file_location("manifest_exp", ROOT / "experiments" / "manifest.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    # Two of the five modalities (an RGB image and the mixed-format signal): compiling the model dominates this
    # test's time and grows with each encoder; every task kind is trained and evaluated.
    c = exp.get_config("smoke,modalities=lateral+labs+ecg")
    c.data.update(manifest=ds.manifest, schema=ds.schema, data_dir=ds.data_dir)
    c.train.update(batch_size=16, num_steps=1, eval_every=1, checkpoint_every=1, log_every=1)
    c.eval_batch_size = 16
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    for split in ("validation", "test"):  # every task kind's metrics equal scikit-learn on the saved predictions
        r, reference = results[split], recomputed(workdir, split, ds.spec.tasks)
        assert r["dx"]["accuracy"] == pytest.approx(reference["dx"]["accuracy"], abs=1e-12)
        assert r["los"]["mae"] == pytest.approx(reference["los"]["mae"], rel=1e-9)
        for task, metric in (("findings", "macro_auroc"), ("died", "auroc"), ("dx", "macro_auroc")):
            if metric in reference[task]:
                assert r[task][metric] == pytest.approx(reference[task][metric], abs=1e-9), (split, task)
        assert r["macro_auroc"] == pytest.approx(reference["macro_auroc"], abs=1e-9), split
    assert DatasetSpec.load(os.path.join(workdir, "dataset_spec.json")) == ds.spec
    _check_predict(ds, workdir, tmp_path)


def _check_predict(ds, workdir, tmp_path):
    """--mode=predict from a moved workdir: the test rows as a new manifest get the probabilities the
    evaluation got; without labels, with a missing modality, an unseen category and a bad row."""
    from mmjax.evaluation.predict import predict
    from mmjax.evaluation.predictor import Predictor
    from mmjax.evaluation.records import load_predictions

    moved = str(tmp_path / "moved")
    shutil.copytree(workdir, moved)
    shutil.rmtree(workdir)  # the workdir's own copy of the schema is what predict reads
    run = Predictor.from_workdir(moved)
    test = [dict(r) for r in ds.rows if r["split"] == "test"]
    same = _write_csv(ds.folder / "predict_same.csv", test)
    out = predict(run, same, str(tmp_path / "same" / "predictions.csv"), log=lambda s: None)
    got = pd.read_csv(out["predictions"], dtype={"id": str})
    preds, _, _, ids = load_predictions(moved, "test", run.tasks)
    order = {pid: k for k, pid in enumerate(ids)}
    rows = [order[pid] for pid in got["id"]]
    assert sorted(rows) == list(range(len(ids)))
    np.testing.assert_allclose(got["died.probability"], preds["died"][rows], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["los.value"], preds["los"][rows], rtol=1e-4, atol=1e-5)
    for k, label in enumerate(ds.spec.tasks[1].label_names):
        np.testing.assert_allclose(got[f"dx.{label}.probability"], preds["dx"][rows, k], rtol=1e-4, atol=1e-6)
    with open(os.path.join(moved, "eval", "test.json")) as f:
        points = json.load(f)["operating_points"]
    for k, label in enumerate(ds.spec.tasks[2].label_names):  # findings: multilabel
        p = got[f"findings.{label}.probability"]
        np.testing.assert_allclose(p, preds["findings"][rows, k], rtol=1e-4, atol=1e-6)
        if "threshold" in points[f"findings.{label}"]:
            assert (got[f"findings.{label}.prediction"] == (p >= points[f"findings.{label}"]["threshold"])).all()
    by_id = {r["pid"]: r for r in test}
    assert list(got["findings.label"].fillna("")) == [";".join(
        c for c in ds.spec.tasks[2].label_names if c in by_id[pid]["findings"]) for pid in got["id"]]
    cells = {"lateral": ("lateral",), "labs": ("age", "crp", "sex", "site"), "ecg": ("ecg",)}
    assert list(got["present"].fillna("")) == [
        ";".join(m for m, cols in cells.items() if any(by_id[pid][c] for c in cols)) for pid in got["id"]]
    with open(os.path.join(moved, "eval", "test.json")) as f:
        threshold = json.load(f)["operating_points"]["died"]["threshold"]
    assert (got["died.prediction"] == (got["died.probability"] >= threshold)).all()
    assert list(got["dx.label"].fillna("")) == [r["dx"] for r in test]
    assert set(got["died.top_modality"]) <= {"lateral", "labs", "ecg"}
    # --calibrated: each task's validation temperature; the decisions at the operating point stay
    from mmjax.metrics import calibration

    out = predict(run, same, str(tmp_path / "cal" / "predictions.csv"), calibrated=True, log=lambda s: None)
    cal = pd.read_csv(out["predictions"], dtype={"id": str})
    temperature = out["temperature_scaled"]
    assert set(temperature) == {"died", "dx", "findings"}
    dx = got[[f"dx.{label}.probability" for label in ds.spec.tasks[1].label_names]].to_numpy()
    np.testing.assert_allclose(cal[[f"dx.{label}.probability" for label in ds.spec.tasks[1].label_names]],
                               calibration.scale_multiclass(dx, temperature["dx"]), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(cal["died.probability"], calibration.scale(got["died.probability"],
                                                                          temperature["died"]), rtol=1e-3, atol=1e-5)
    assert (cal["died.prediction"] == got["died.prediction"]).all()
    assert (cal["dx.prediction"] == got["dx.prediction"]).all()

    new = [{k: v for k, v in r.items() if k not in ("split", "died", "los", "findings")} for r in test]
    new[0]["lateral"] = ""  # a missing modality: its Shapley value is exactly 0, never the top one
    new[1]["site"] = "Z"  # unseen in training, as p011 and p023's 'D'
    (ds.folder / "signals" / "broken.npy").write_bytes(b"\x93NUMPY garbage" * 8)
    new[2]["ecg"] = "signals/broken.npy"
    bad = _write_csv(ds.folder / "predict_new.csv", new)
    with pytest.raises(DataError, match=rf"row 3 \(id '{new[2]['pid']}'\), column 'ecg'.*broken\.npy"):
        predict(run, bad, str(tmp_path / "strict" / "p.csv"), log=lambda s: None)
    out = predict(run, bad, str(tmp_path / "new" / "p.csv"), on_error="skip", log=lambda s: None)
    got = pd.read_csv(out["predictions"], dtype={"id": str})
    assert out["skipped_rows"] == 1 and list(got["row"]) == [1, 2] + list(range(4, len(new) + 1))
    assert list(got["id"]) == [new[r - 1]["pid"] for r in got["row"]]
    assert got["present"][0] == "labs;ecg"  # its image cell emptied
    assert pd.read_csv(out["skipped_file"])["column"].tolist() == ["ecg"]
    assert out["unseen_categories"]["labs"] == {"sex": 0, "site": 1 + sum(r["site"] == "D" for r in new)}
    assert "died.label" not in got and "dx.label" in got
    for task in ("died", "dx", "findings", "los"):
        assert got[f"{task}.top_modality"][0] != "lateral"
    assert np.isfinite(got[[c for c in got if c.endswith(".probability")]].to_numpy()).all()
    # the same through the launcher
    cli = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--workdir={moved}", "--mode=predict",
                          f"--manifest={bad}", "--on_error=skip", f"--output={tmp_path / 'cli' / 'p.csv'}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert f"Predicted {len(new) - 1} of {len(new)} rows" in cli.stdout and "1 skipped" in cli.stdout
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cli" / "p.csv", dtype={"id": str}), got)


# ------------------------------------------------------------------------------ 9. no TensorFlow, no torch


def test_tensorflow_and_torch_are_never_imported(tmp_path):
    manifest, schema = _small(tmp_path, n=4)
    code = textwrap.dedent(f"""
        import sys
        from mmjax.data import pipeline
        from mmjax.data.manifest import builder
        b = builder.load({manifest!r}, {schema!r}, {str(tmp_path / "tfds")!r}, workers=1)
        spec = pipeline.DatasetSpec.from_builder(b)
        next(iter(pipeline.train_loader(b, spec, 2, seed=0, shard_index=0, shard_count=1)))
        next(pipeline.eval_batches(b, spec, "test", 2, shard_index=0, shard_count=1))
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "torch"))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    assert "Preparing manifest/small" in out.stdout  # it prepared the dataset, not reused one


def test_nullable_and_list_cells_from_jsonl(tmp_path):
    """pd.NA / null cells are empty (absent, unknown); a JSON list is a multilabel cell."""
    import pandas as pd

    from mmjax.data.manifest import table

    rows = [{"id": "a", "x": 1.5, "labels": ["p", "q"]}, {"id": "b", "x": None, "labels": None},
            {"id": "c", "x": pd.NA, "labels": ["q"]}]
    df = pd.DataFrame(rows).astype({"x": "Float64"})
    path = tmp_path / "m.parquet"
    df.to_parquet(path)
    got = table.read_table(str(path))
    assert got["x"].tolist() == ["1.5", "", ""]
    t = {"kind": "multilabel", "column": "labels", "classes": ["p", "q"], "separator": ";", "unknown_values": []}
    y, known, _, bad = table.parse_labels(got, "labels", t, np.ones(3, bool))
    assert not bad
    np.testing.assert_array_equal(y, [[1, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(known.all(axis=1), [True, False, True])


def test_empty_split_cell_is_assigned_by_hash():
    import pandas as pd

    from mmjax.data.manifest import table
    from mmjax.data.manifest.schema import Schema

    schema = Schema("s.yaml", "s", "id", "split", "strict", {}, {})
    df = pd.DataFrame({"id": [f"p{i}" for i in range(50)], "split": ["test"] * 10 + [""] * 40})
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    splits, bad = table.assign_splits(df, schema, fractions, 0, 0, "m.csv")
    assert not bad and splits[:10] == ["test"] * 10
    no_column = Schema("s.yaml", "s", "id", None, "strict", {}, {})
    by_hash, _ = table.assign_splits(df, no_column, fractions, 0, 0, "m.csv")
    assert splits[10:] == by_hash[10:]


def test_degenerate_numeric_column_and_error_metrics_direction():
    from mmjax.config import lower_is_better
    from mmjax.data.spec import std_with_floor

    x = np.array([[0.0, 5.0, np.nan, 140.0], [0.0, 5.0, np.nan, 143.0], [0.0, 5.0001, np.nan, 137.0]])
    mean, std = std_with_floor(x)
    assert std[0] == 1.0  # always 0 in training: a later 1 standardizes to 1, not 1000
    assert std[1] == pytest.approx(1e-3 * 5.0, rel=1e-3)  # near-constant: the relative floor
    assert mean[2] == 0.0 and std[2] == 1.0  # never observed
    assert std[3] == pytest.approx(np.std([140.0, 143.0, 137.0]))
    assert lower_is_better("los.mae") and lower_is_better("los.rmse") and not lower_is_better("macro_auroc")
    assert not lower_is_better("answer.accuracy")
