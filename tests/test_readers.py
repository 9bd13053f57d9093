"""File decoders of the manifest dataset: every format is written in tmp_path and read back to known numbers."""

import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from mmjax.data.manifest import readers
from mmjax.data.manifest.readers import ReadError

CINC = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cinc2021_sample" / "records"


def _testdata(name):
    """A DICOM file shipped inside pydicom (never downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


# ----------------------------------------------------------------------------------------------------------- images


def test_png_gradient_round_trips(tmp_path):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64, left dark -> right bright
    Image.fromarray(gradient, "L").save(tmp_path / "g.png")
    out = readers.read_image(str(tmp_path / "g.png"), size=64, channels=1)
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], gradient)
    rgb = readers.read_image(str(tmp_path / "g.png"), size=64, channels=3)
    assert rgb.shape == (64, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gradient)


def test_aspect_ratio_is_kept_with_black_bars(tmp_path):
    Image.new("RGB", (80, 40), (200, 120, 40)).save(tmp_path / "wide.png")  # 2:1
    out = readers.read_image(str(tmp_path / "wide.png"), size=32, channels=3)
    assert out.shape == (32, 32, 3)
    assert (out[:8] == 0).all() and (out[24:] == 0).all()  # 32 x 16 picture centred vertically
    np.testing.assert_allclose(out[9:23].reshape(-1, 3).mean(0), [200, 120, 40], atol=2)

    Image.new("L", (20, 40), 180).save(tmp_path / "tall.png")  # 1:2
    out = readers.read_image(str(tmp_path / "tall.png"), size=32, channels=1)[..., 0]
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    assert (np.abs(out[:, 9:23].astype(int) - 180) <= 2).all()


def test_jpeg_rgb_and_grayscale(tmp_path):
    Image.new("RGB", (48, 48), (255, 0, 0)).save(tmp_path / "red.jpg", quality=95)
    rgb = readers.read_image(str(tmp_path / "red.jpg"), size=24, channels=3)
    assert rgb.shape == (24, 24, 3)
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), [255, 0, 0], atol=6)
    gray = readers.read_image(str(tmp_path / "red.jpg"), size=24, channels=1)
    assert gray.shape == (24, 24, 1)
    assert abs(gray.mean() - 0.299 * 255) < 4  # ITU-R 601 luma of pure red


def test_16_bit_png_is_stretched_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(1000, 4000, 32).astype(np.uint16), (32, 1))  # 12-bit X-ray-like values
    Image.fromarray(ramp).save(tmp_path / "xray.png")
    out = readers.read_image(str(tmp_path / "xray.png"), size=32, channels=1)[..., 0]
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255
    assert (np.diff(out[0].astype(int)) >= 0).all()


def _dicom_copy(tmp_path, name, **changes):
    import pydicom

    ds = pydicom.dcmread(_testdata(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / f"{pathlib.Path(name).stem}_copy.dcm"
    ds.save_as(path)
    return str(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_reads(name):
    out = readers.read_image(_testdata(name), size=32, channels=1)
    assert out.shape == (32, 32, 1) and out.dtype == np.uint8
    assert out.std() > 10
    rgb = readers.read_image(_testdata(name), size=32, channels=3)
    assert rgb.shape == (32, 32, 3) and (rgb[..., 0] == rgb[..., 2]).all()


def test_dicom_intensity_transforms_match_the_standard():
    import pydicom

    # CT_small: RescaleSlope/Intercept to HU, no window in the file -> min-max of HU.
    ct = pydicom.dcmread(_testdata("CT_small.dcm"))
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    out = readers.read_image(_testdata("CT_small.dcm"), size=128, channels=1)[..., 0].astype(int)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert np.abs(out - expected).max() <= 1

    # An explicit window (center, width) in HU replaces it.
    windowed = readers.read_image(_testdata("CT_small.dcm"), size=128, channels=1, window=(100, 200))[..., 0]
    expected = np.rint(np.clip((hu - 0) / 200, 0, 1) * 255)
    assert np.abs(windowed.astype(int) - expected).max() <= 1
    assert (windowed == 0).mean() > 0.05 and (windowed == 255).mean() > 0.05 and (windowed != out).mean() > 0.5

    # MR_small carries WindowCenter 600 / WidthWidth 1600: the DICOM LINEAR window (PS3.3 C.11.2.1.2.1) applies.
    mr = pydicom.dcmread(_testdata("MR_small.dcm"))
    c, w = float(mr.WindowCenter), float(mr.WindowWidth)
    expected = np.rint(np.clip((mr.pixel_array - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)
    out = readers.read_image(_testdata("MR_small.dcm"), size=64, channels=1)[..., 0]
    assert np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])  # min-max and file-window paths
def test_monochrome1_is_inverted(tmp_path, name):
    mono2 = readers.read_image(_testdata(name), size=64, channels=1).astype(int)
    mono1 = readers.read_image(_dicom_copy(tmp_path, name, PhotometricInterpretation="MONOCHROME1"), 64, 1)
    assert np.abs(mono1.astype(int) - (255 - mono2)).max() <= 1


def test_dicom_found_by_preamble_without_extension(tmp_path):
    shutil.copy(_testdata("CT_small.dcm"), tmp_path / "scan")
    np.testing.assert_array_equal(
        readers.read_image(str(tmp_path / "scan"), 32, 1), readers.read_image(_testdata("CT_small.dcm"), 32, 1)
    )


def test_multiframe_dicom_uses_the_middle_frame(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    frame = ds.pixel_array
    ds.PixelData = np.stack([np.zeros_like(frame), frame, frame[::-1]]).tobytes()
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "multi.dcm")
    np.testing.assert_array_equal(
        readers.read_image(str(tmp_path / "multi.dcm"), 64, 1), readers.read_image(_testdata("MR_small.dcm"), 64, 1)
    )


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE Lossless: pydicom's own numpy decoder
        "JPEG2000.dcm",  # JPEG 2000: Pillow (with OpenJPEG), pylibjpeg-openjpeg or gdcm
        "SC_rgb_jpeg_dcmtk.dcm",  # 8-bit JPEG Baseline, YBR colour: Pillow
        "JPEG-lossy.dcm",  # 12-bit JPEG Extended: Pillow cannot, pylibjpeg-libjpeg or gdcm can
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS: pylibjpeg-libjpeg or gdcm only
    ],
)
def test_compressed_dicom_decodes_or_names_the_missing_handler(name):
    import pydicom

    syntax = pydicom.dcmread(_testdata(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    try:
        out = readers.read_image(_testdata(name), size=32, channels=3)
    except ReadError as e:
        assert syntax.name in str(e) and "pylibjpeg" in str(e), str(e)
        return
    assert out.shape == (32, 32, 3) and out.std() > 5
    if name == "MR_small_RLE.dcm":  # lossless: same pixels as the uncompressed original
        np.testing.assert_array_equal(out, readers.read_image(_testdata("MR_small.dcm"), 32, 3))


def test_pixel_cap_is_read_from_the_header(tmp_path):
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(tmp_path / "a.png")
    assert readers.image_size(str(tmp_path / "a.png")) == (16, 8, 1)
    with pytest.raises(ReadError, match=r"128 pixels \(16x8\) are more than max_pixels=127"):
        readers.read_image(str(tmp_path / "a.png"), 8, 1, max_pixels=127)
    assert readers.read_image(str(tmp_path / "a.png"), 8, 1, max_pixels=128).shape == (8, 8, 1)
    assert readers.read_image(str(tmp_path / "a.png"), 8, 1, max_pixels=0).shape == (8, 8, 1)  # 0: no cap
    dicom = _dicom_copy(tmp_path, "MR_small.dcm", NumberOfFrames=3, Rows=64, Columns=64)  # a header, not decoded
    assert readers.image_size(dicom) == (64, 64, 3)


@pytest.mark.parametrize("window", [None, (40, 400)])
def test_non_finite_dicom_pixels_are_an_error(tmp_path, window):
    nan = _dicom_copy(tmp_path, "CT_small.dcm", RescaleSlope="NaN")
    with pytest.raises(ReadError, match="non-finite pixel values after the modality LUT"):
        readers.read_image(nan, 16, 1, window)


def test_image_errors(tmp_path):
    with pytest.raises(ReadError, match="file not found"):
        readers.read_image(str(tmp_path / "nope.png"), 32, 1)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ReadError, match=r"cannot decode image \("):
        readers.read_image(str(tmp_path / "bad.png"), 32, 1)
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file")
    with pytest.raises(ReadError, match="cannot decode image"):
        readers.read_image(str(tmp_path / "bad.dcm"), 32, 1)


# ---------------------------------------------------------------------------------------------------------- signals


def test_wav_resampled_to_half_rate(tmp_path):
    from scipy.io import wavfile

    t = np.arange(800) / 200.0  # 4 s at 200 Hz
    source = np.stack([0.5 * np.sin(2 * np.pi * 2 * t), 0.25 * np.cos(2 * np.pi * 3 * t)], axis=1)
    wavfile.write(tmp_path / "s.wav", 200, np.rint(source * 32767).astype(np.int16))
    out = readers.read_signal(str(tmp_path / "s.wav"), rate=100, channels=2)
    assert out.shape == (400, 2) and out.dtype == np.float32
    t100 = np.arange(400) / 100.0
    expected = np.stack([0.5 * np.sin(2 * np.pi * 2 * t100), 0.25 * np.cos(2 * np.pi * 3 * t100)], axis=1)
    np.testing.assert_allclose(out[20:-20], expected[20:-20], atol=0.01)  # edges hold the filter's transient
    same = readers.read_signal(str(tmp_path / "s.wav"), rate=200, channels=[1])
    np.testing.assert_allclose(same[:, 0], source[:, 1], atol=1e-4)


def test_npy_one_dimensional_and_file_rate(tmp_path):
    t = np.arange(500) / 50.0
    np.save(tmp_path / "x.npy", np.sin(2 * np.pi * 0.5 * t))
    out = readers.read_signal(str(tmp_path / "x.npy"), rate=50, channels=1)
    assert out.shape == (500, 1)
    up = readers.read_signal(str(tmp_path / "x.npy"), rate=100, channels=1, file_rate=50)
    assert up.shape == (1000, 1)
    np.testing.assert_allclose(up[50:-50, 0], np.sin(2 * np.pi * 0.5 * np.arange(1000) / 100)[50:-50], atol=0.01)


def test_npy_channels_first_is_transposed(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 400))
    np.save(tmp_path / "cf.npy", x)
    np.testing.assert_allclose(readers.read_signal(str(tmp_path / "cf.npy"), 100, 3), x.T.astype(np.float32))
    np.testing.assert_allclose(readers.read_signal(str(tmp_path / "cf.npy"), 100, [2, 0]), x[[2, 0]].T, rtol=1e-6)


def test_csv_with_header_and_time_column(tmp_path):
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(3, 100))
    lines = ["time,a,b,c"] + [f"{i / 10},{a[i]},{b[i]},{c[i]}" for i in range(100)]
    (tmp_path / "h.csv").write_text("\n".join(lines))
    out = readers.read_signal(str(tmp_path / "h.csv"), rate=10, channels=["c", "a"])
    np.testing.assert_allclose(out, np.stack([c, a], 1), rtol=1e-6)
    all3 = readers.read_signal(str(tmp_path / "h.csv"), rate=10, channels=3)  # 'time' is not a channel
    np.testing.assert_allclose(all3, np.stack([a, b, c], 1), rtol=1e-6)
    with pytest.raises(ReadError, match=r"no channel named 'z'.*\['a', 'b', 'c'\]"):
        readers.read_signal(str(tmp_path / "h.csv"), rate=10, channels=["a", "z"])


def test_csv_without_header(tmp_path):
    x = np.arange(60, dtype=float).reshape(30, 2)
    np.savetxt(tmp_path / "n.csv", x, delimiter=",")
    np.testing.assert_allclose(readers.read_signal(str(tmp_path / "n.csv"), 10, 2), x)
    np.testing.assert_allclose(readers.read_signal(str(tmp_path / "n.csv"), 10, [1]), x[:, 1:])
    with pytest.raises(ReadError, match="no channel names"):
        readers.read_signal(str(tmp_path / "n.csv"), 10, ["a"])


def test_mat_variable_and_channels_first(tmp_path):
    from scipy.io import savemat

    val = np.random.default_rng(2).normal(size=(2, 300))
    savemat(tmp_path / "m.mat", {"val": val, "meta": np.ones((1, 1))})
    with pytest.raises(ReadError, match=r"has variables \['val', 'meta'\]"):
        readers.read_signal(str(tmp_path / "m.mat"), 100, 2)
    out = readers.read_signal(str(tmp_path / "m.mat"), 100, 2, variable="val")
    np.testing.assert_allclose(out, val.T, rtol=1e-6)
    savemat(tmp_path / "one.mat", {"val": val})
    np.testing.assert_allclose(readers.read_signal(str(tmp_path / "one.mat"), 100, 2), val.T, rtol=1e-6)


def test_wfdb_record(tmp_path):
    import wfdb
    from scipy.signal import resample_poly

    t = np.arange(2500) / 250.0
    source = np.stack([np.sin(2 * np.pi * 1 * t), 0.5 * np.cos(2 * np.pi * 2 * t), 2 * np.sin(2 * np.pi * 3 * t)], 1)
    wfdb.wrsamp(
        "rec",
        fs=250,
        units=["mV"] * 3,
        sig_name=["a", "b", "c"],
        p_signal=source,
        fmt=["16"] * 3,
        write_dir=str(tmp_path),
    )
    full = readers.read_signal(str(tmp_path / "rec.hea"), rate=250, channels=3)
    np.testing.assert_allclose(full, source, atol=1e-4)  # 16-bit quantization of a +-2 mV range
    out = readers.read_signal(str(tmp_path / "rec"), rate=125, channels=["c", "a"])
    assert out.shape == (1250, 2)
    np.testing.assert_allclose(out, resample_poly(source[:, [2, 0]], 1, 2, axis=0), atol=1e-4)
    np.testing.assert_allclose(out[50:-50, 0], 2 * np.sin(2 * np.pi * 3 * np.arange(1250) / 125)[50:-50], atol=0.01)
    header = readers.read_signal_header(str(tmp_path / "rec.hea"))
    assert header["fs"] == 250 and header["sig_name"] == ["a", "b", "c"]


def test_signal_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((100, 3)))
    with pytest.raises(ReadError, match="has 3 channels, expected 2"):
        readers.read_signal(str(tmp_path / "x.npy"), 100, 2)
    with pytest.raises(ReadError, match="out of range"):
        readers.read_signal(str(tmp_path / "x.npy"), 100, [3])
    with pytest.raises(ReadError, match="file not found"):
        readers.read_signal(str(tmp_path / "missing.npy"), 100, 1)
    with pytest.raises(ReadError, match="file not found"):
        readers.read_signal(str(tmp_path / "missing_record"), 100, 1)
    bad = np.zeros(100)
    bad[7] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ReadError, match="contains NaN or infinite samples"):
        readers.read_signal(str(tmp_path / "nan.npy"), 100, 1)
    (tmp_path / "x.xyz").write_text("1,2,3")
    with pytest.raises(ReadError, match=r"unsupported signal format '\.xyz'; use \.wav"):
        readers.read_signal(str(tmp_path / "x.xyz"), 100, 1)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ReadError, match="cannot read signal"):
        readers.read_signal(str(tmp_path / "bad.wav"), 100, 1)


def test_cinc2021_record():
    if not (CINC / "E07500.hea").exists():
        pytest.skip(f"CinC 2021 sample not present at {CINC}")
    out = readers.read_signal(str(CINC / "E07500.hea"), rate=100, channels=12)
    assert out.shape == (1000, 12) and out.dtype == np.float32 and out.std() > 0
    header = readers.read_signal_header(str(CINC / "E07500.hea"))
    assert header["fs"] == 500 and "Age: 78" in header["comments"] and header["sig_name"][:2] == ["I", "II"]
    from_mat = readers.read_signal(str(CINC / "E07500.mat"), rate=100, channels=12)  # WFDB, in physical mV
    np.testing.assert_array_equal(from_mat, out)
    leads = readers.read_signal(str(CINC / "E07500.mat"), rate=100, channels=["V1", "I"])
    np.testing.assert_array_equal(leads, out[:, [6, 0]])


# ------------------------------------------------------------------------------------------------------------- text


def test_text_cell_is_a_path_only_when_declared_or_a_file(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "r1.txt").write_text("Findings: clear lungs. Ünïcode ok.\n", encoding="utf-8")
    base = str(tmp_path)
    path = readers.text_path("notes/r1.txt", base)
    assert path == str(tmp_path / "notes" / "r1.txt")
    assert readers.read_text(path) == "Findings: clear lungs. Ünïcode ok.\n"
    assert readers.text_path(str(tmp_path / "notes" / "r1.txt"), "/elsewhere") == path
    for note in ("mild cardiomegaly", "line one\nsee old.txt", "see discharge.txt", "notes/missing.txt"):
        assert readers.text_path(note, base) is None, note  # inline text
    assert readers.text_path("notes/r1.txt", base, file=False) is None
    assert readers.text_path("notes/missing.txt", base, file=True) == str(tmp_path / "notes" / "missing.txt")
    with pytest.raises(ReadError, match="file not found"):
        readers.read_text(str(tmp_path / "notes" / "missing.txt"))


def test_paths_are_confined_to_the_allowed_roots(tmp_path):
    root = tmp_path / "study"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(b"")
    (tmp_path / "out.png").write_bytes(b"")
    (root / "imgs" / "link.png").symlink_to(tmp_path / "out.png")
    roots = (str(root.resolve()),)
    assert readers.inside(readers.resolve("imgs/a.png", str(root)), roots)
    assert readers.inside(readers.resolve("imgs/../imgs/a.png", str(root)), roots)
    for cell in ("../out.png", str(tmp_path / "out.png"), "imgs/link.png", "/etc/passwd"):
        assert not readers.inside(readers.resolve(cell, str(root)), roots), cell
    assert readers.inside(readers.resolve("imgs/link.png", str(root)), roots + (str(tmp_path.resolve()),))


def test_resolve(tmp_path):
    assert readers.resolve("a/b.png", "/data") == "/data/a/b.png"
    assert readers.resolve("/abs/b.png", "/data") == "/abs/b.png"
    assert readers.resolve("~/b.png", "/data") == str(pathlib.Path.home() / "b.png")
