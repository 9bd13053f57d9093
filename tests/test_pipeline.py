"""The Grain input pipeline: batch contract, masks, exactly-once evaluation, sharding, resume."""

import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmjax.batch import ModalitySpec, validate_batch
from mmjax.data import pipeline, sources
from mmjax.data import transforms as T
from mmjax.data.spec import DataError, length_histogram, std_with_floor, truncation
from mmjax.data.synthetic.generate import MODALITIES
from mmjax.data.tokenizer import UNK, WordPieceTokenizer


def _all_ids(builder, split):
    src = builder.as_data_source(split)
    return sorted(str(int(src[i]["patient_id"])) for i in range(len(src)))  # batches carry ids as str


def test_a_builder_before_its_data_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """TFDS looks up an unprepared dataset's metadata in its GCS bucket and leaves an empty
    `tmp*tfds` folder in the temporary directory each time; mmjax's builders skip that lookup."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    builder = sources.load_builder("synthetic_patients/tiny", str(tmp_path / "data"), prepare=False)
    assert builder.info.splits == {}  # nothing prepared, nothing read
    assert list((tmp_path / "tmp").iterdir()) == []


def test_train_batches_follow_the_contract(tiny_builder, tiny_spec):
    it = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=0, shard_index=0, shard_count=1))
    batch = next(it)
    validate_batch(batch, tiny_spec.tasks)
    validate_batch(batch, tiny_spec.tasks, tiny_spec.modalities)
    assert batch["image"]["values"].shape == (16, 32, 32, 1)
    assert batch["text"]["values"].dtype == np.int32 and batch["text"]["values"].shape == (16, 96)
    assert batch["tabular"]["values"].shape == (16, 16)
    assert batch["tabular"]["categories"].shape == (16, 0) and batch["tabular"]["categories"].dtype == np.int32
    assert batch["signal"]["values"].shape == (16, 1000, 1) and batch["signal"]["mask"].shape == (16, 1000)
    assert batch["labels"]["diagnosis"].shape == (16, 5)
    assert batch["example_mask"].all()
    assert batch["patient_id"].dtype.kind == "U"
    shapes = jax.tree.map(np.shape, batch)
    for _ in range(20):  # stable shapes and dtypes, across epoch boundaries too
        assert jax.tree.map(np.shape, next(it)) == shapes


def test_presence_masks_are_honoured(tiny_builder, tiny_spec):
    seen_absent = dict.fromkeys(MODALITIES, 0)
    for batch in pipeline.eval_batches(tiny_builder, tiny_spec, "train", 32, shard_index=0, shard_count=1):
        for m in MODALITIES:
            absent = ~batch[m]["present"]
            seen_absent[m] += int(absent[batch["example_mask"]].sum())
            assert np.all(batch[m]["values"][absent] == 0), m
            if m != "image":
                assert not batch[m]["mask"][absent].any(), m
                assert batch[m]["mask"][batch[m]["present"]].any(axis=-1).all(), m
        present_img = batch["image"]["present"]
        assert np.all(batch["image"]["values"][present_img].std(axis=(1, 2, 3)) > 0.1)
    assert all(v > 0 for v in seen_absent.values()), seen_absent


def test_tabular_missing_values_are_masked_not_imputed(tiny_builder, tiny_spec):
    src = tiny_builder.as_data_source("validation")
    batch = next(pipeline.eval_batches(tiny_builder, tiny_spec, "validation", 96, shard_index=0, shard_count=1))
    raw = np.stack([src[i]["labs"] for i in range(len(src))])
    np.testing.assert_array_equal(batch["tabular"]["mask"], ~np.isnan(raw))
    assert np.all(batch["tabular"]["values"][np.isnan(raw)] == 0)
    tab = tiny_spec.modality("tabular")
    j = tab.numeric.index("sodium")  # not log-scaled
    assert not tab.log_scale[j]
    ok = ~np.isnan(raw[:, j])
    expect = (raw[ok, j] - tab.mean[j]) / tab.std[j]
    np.testing.assert_allclose(batch["tabular"]["values"][ok, j], expect, rtol=1e-5)


def test_statistics_come_from_the_training_split_only(tiny_builder, tiny_spec):
    def stats(split):
        src = tiny_builder.as_data_source(split)
        labs = np.stack([src[i]["labs"] for i in range(len(src))]).astype(np.float64)
        labs = np.where(tiny_spec.modality("tabular").log_scale, np.log(labs), labs)
        return np.nanmean(labs, 0)

    mean = np.asarray(tiny_spec.modality("tabular").mean)
    np.testing.assert_allclose(mean, stats("train"), rtol=1e-5)
    assert not np.allclose(mean, stats("test"), rtol=1e-3)


@pytest.mark.parametrize("batch_size,shards", [(32, 1), (50, 1), (16, 2), (7, 3)])
def test_eval_counts_every_example_exactly_once(tiny_builder, tiny_spec, batch_size, shards):
    seen, counts = [], []
    for shard in range(shards):
        batches = list(pipeline.eval_batches(tiny_builder, tiny_spec, "test", batch_size,
                                             shard_index=shard, shard_count=shards))
        counts.append(len(batches))
        for b in batches:
            assert b["example_mask"].shape == (batch_size,)
            seen += b["patient_id"][b["example_mask"]].tolist()
            pad = ~b["example_mask"]
            assert not any(b[m]["present"][pad].any() for m in MODALITIES)
            assert not b["label_mask"]["diagnosis"][pad].any()
    assert sorted(seen) == _all_ids(tiny_builder, "test")  # no duplicates, nothing dropped
    assert len(set(counts)) == 1 and counts[0] == pipeline.num_eval_batches(120, batch_size, shards)


def test_train_shards_are_disjoint_and_cover_the_split(tiny_builder, tiny_spec):
    ids = []
    for shard in range(2):
        it = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=3, augment=False,
                                        shard_index=shard, shard_count=2))
        ids.append(np.concatenate([next(it)["patient_id"] for _ in range(8)]))  # 128 = one epoch
    a, b = set(ids[0].tolist()), set(ids[1].tolist())
    assert len(a) == len(b) == 128 and not a & b
    assert sorted(a | b) == _all_ids(tiny_builder, "train")


@pytest.mark.parametrize("shards", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(tiny_builder, tiny_spec, shards):
    """Each process's rows of global batch k, stacked, are one process's batch k, augmentation and
    random crops included, from any start: a run resumes on another process count where it stopped."""
    one = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=0, shard_index=0, shard_count=1,
                                     start_batch=5))
    parts = [iter(pipeline.train_loader(tiny_builder, tiny_spec, 16 // shards, seed=0, shard_index=i,
                                        shard_count=shards, start_batch=5)) for i in range(shards)]
    for _ in range(12):  # across the epoch boundary (16 global batches)
        stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *[next(p) for p in parts])
        jax.tree.map(np.testing.assert_array_equal, stacked, next(one))


def test_shuffling_is_seeded_and_reshuffles_each_epoch(tiny_builder, tiny_spec):
    def ids(seed, n=32):
        it = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=seed, augment=False,
                                        shard_index=0, shard_count=1))
        return np.concatenate([next(it)["patient_id"] for _ in range(n)])

    a, b, c = ids(0), ids(0), ids(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:256], a[256:])  # epoch 2 differs from epoch 1
    assert sorted(a[:256]) == sorted(a[256:])


def test_iterator_state_restores_the_same_batches(tiny_builder, tiny_spec):
    loader = pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=0, shard_index=0, shard_count=1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(20)]  # crosses an epoch boundary (16 batches per epoch)
    resumed = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=0, shard_index=0, shard_count=1))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        jax.tree.map(np.testing.assert_array_equal, got, want)  # augmentation included


def test_examples_kept_in_memory_give_the_same_batches(tiny_builder, tiny_spec, capsys):
    """With the training split kept in memory (the default), every epoch's batches equal those read and
    prepared afresh (cache_mib=0), random crops and augmentation included, and from the second epoch
    nothing is read; a split larger than the limit is read every epoch, and a line says so."""
    reads = []

    class Counted:  # the builder, its training records counted as they are read (by this test's loaders only)
        def __getattr__(self, name):
            return getattr(tiny_builder, name)

        def as_data_source(self, split):
            source = tiny_builder.as_data_source(split)
            return type("CountedSource", (), {"__len__": lambda _: len(source),
                                              "__getitem__": lambda _, i: reads.append(i) or source[i]})()

    kw = dict(seed=0, shard_index=0, shard_count=1)
    kept = iter(pipeline.train_loader(Counted(), tiny_spec, 16, **kw))
    batches = [next(kept) for _ in range(40)]  # 2.5 epochs of 16 batches
    assert sorted(reads) == list(range(256))  # each example read once
    reads.clear()
    fresh = iter(pipeline.train_loader(Counted(), tiny_spec, 16, cache_mib=0, **kw))
    for want in batches:
        jax.tree.map(np.testing.assert_array_equal, next(fresh), want)
    assert len(reads) > 2 * 256
    kept.close(), fresh.close()  # their read-ahead threads stop reading
    reads.clear()
    small = iter(pipeline.train_loader(Counted(), tiny_spec, 16, cache_mib=1, **kw))
    for want in batches[:20]:
        jax.tree.map(np.testing.assert_array_equal, next(small), want)
    assert len(reads) > 256 and "exceed the limit of 1 MiB per process" in capsys.readouterr().out


def test_the_kept_examples_stop_at_the_limit_in_bytes(capsys):
    """Examples of growing size: those that fit in the limit are kept (counted in bytes, not judged on
    the first alone), the rest are read every time, and one line says so."""
    sizes = [100, 100, 300, 300, 300, 50]
    source = [{"x": np.zeros(n, np.uint8)} for n in sizes]
    kept = pipeline._CachedSource(source, [], limit_bytes=1000, what="growing")
    for _ in range(2):
        assert [kept[i]["x"].size for i in range(len(sizes))] == sizes
    assert sorted(kept._kept) == [0, 1, 2, 3] and kept._bytes == 800
    assert capsys.readouterr().out.count("4 examples kept (0 MiB) reached the limit") == 1


def test_the_read_ahead_is_bounded_in_bytes(tiny_spec):
    """128 small batches are read ahead; of `synthetic_patients/large` (224x224 images, 12-lead 500 Hz
    ECGs: ~14 MB a batch of 32) only what fits in 256 MiB, shared among the workers, and never fewer than 2."""
    from mmjax.data.synthetic.builder import SyntheticPatients, fit_metadata
    from mmjax.data.synthetic.generate import generate_split

    assert pipeline.read_ahead(tiny_spec, None, 16, 48) == 128
    cfg = SyntheticPatients.builder_configs["large"]
    large = pipeline.DatasetSpec.from_metadata(fit_metadata(generate_split(cfg.settings, "train", 4)[0], cfg))
    assert [pipeline.read_ahead(large, None, 32, 512, w) for w in (0, 2, 8)] == [15, 7, 2]
    assert pipeline.read_ahead(large, ("tabular",), 32, 512) == 128


def test_workers_give_the_same_batches(tiny_builder, tiny_spec):
    kw = dict(seed=0, shard_index=0, shard_count=1)
    a = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, **kw))
    b = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, worker_count=2, **kw))
    for _ in range(3):
        jax.tree.map(np.testing.assert_array_equal, next(a), next(b))
    b.close()


def test_augmentation_geometry_is_exact():
    rng = np.random.default_rng(0)
    x = rng.random((3, 8, 8, 1)).astype(np.float32)
    batch = {"image": {"values": x.copy(), "present": np.array([True, True, False])}}
    still = T.AugmentImages(max_zoom=1.0, max_shift=0.0, max_degrees=0.0, flip_probability=0.0, intensity=0.0)
    out = still.random_map({"image": dict(batch["image"])}, rng)["image"]["values"]
    np.testing.assert_allclose(out[:2], x[:2], atol=1e-5)
    assert np.all(out[2] == 0)  # absent images stay zero
    flip = T.AugmentImages(max_zoom=1.0, max_shift=0.0, max_degrees=0.0, flip_probability=1.0, intensity=0.0)
    out = flip.random_map({"image": dict(batch["image"])}, rng)["image"]["values"]
    np.testing.assert_allclose(out[:2], x[:2, :, ::-1], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_the_batch_warp_equals_scipy_image_by_image(dtype):
    """The augmentation's XLA warp over a batch equals SciPy's bilinear resampling of each image alone
    (`map_coordinates`, order 1, edges clamped) at the same coordinates, standardized and jittered."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    b, h, w, c = 4, 9, 7, 3
    x = rng.integers(0, 256, (b, h, w, c)).astype(dtype)
    affine = np.concatenate([rng.normal(1, 0.2, (b, 2)), rng.normal(0, 2, (b, 1)),
                             rng.normal(0, 0.3, (b, 1)), rng.normal(1, 0.2, (b, 1)), rng.normal(0, 2, (b, 1))], 1)
    affine = affine.astype(np.float32)
    channel = np.stack([rng.uniform(0.002, 0.02, c), rng.normal(0, 1, c)]).astype(np.float32)
    intensity = np.stack([rng.uniform(0.9, 1.1, b), rng.uniform(-0.1, 0.1, b)], 1).astype(np.float32)
    present = np.array([True, True, False, True])
    out = T._warp(x, affine, channel, intensity, present)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for k in range(b):
        a = affine[k].astype(np.float64)
        xs, ys = a[0] * j + a[1] * i + a[2], a[3] * j + a[4] * i + a[5]
        for ch in range(c):
            want = ndimage.map_coordinates(x[k, :, :, ch].astype(np.float64), [ys, xs], order=1, mode="nearest")
            want = (want * channel[0, ch] + channel[1, ch]) * intensity[k, 0] + intensity[k, 1]
            np.testing.assert_allclose(out[k, :, :, ch], want * present[k], rtol=1e-5, atol=1e-5)


def test_augmenting_uint8_equals_augmenting_the_standardized_images():
    """Training augments the uint8 images and standardizes them as it samples: the same values (to float
    rounding) as standardizing first (`ImageToFloat`) and augmenting the floats, with the same draws."""
    rng = np.random.default_rng(1)
    spec = ModalitySpec("xray", "image", shape=(16, 12, 3), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    batch = {"xray": {"values": rng.integers(0, 256, (5, 16, 12, 3)).astype(np.uint8),
                      "present": np.array([True, False, True, True, True])}}
    fused = T.AugmentImages(specs=(spec,)).random_map(
        {"xray": dict(batch["xray"])}, np.random.default_rng(7))["xray"]["values"]
    floats = T.ImageToFloat((spec,)).map({"xray": dict(batch["xray"])})
    two_steps = T.AugmentImages(names=("xray",)).random_map(floats, np.random.default_rng(7))["xray"]["values"]
    assert fused.dtype == np.float32 and np.all(fused[1] == 0)
    np.testing.assert_allclose(fused, two_steps, rtol=1e-5, atol=1e-5)
    assert np.abs(fused - T.ImageToFloat((spec,)).map({"xray": dict(batch["xray"])})["xray"]["values"]).max() > 0.1


def test_spectrogram_front_end(tiny_builder, tiny_spec):
    batch = next(pipeline.eval_batches(tiny_builder, tiny_spec, "test", 8, spectrogram=True,
                                       shard_index=0, shard_count=1))
    frames = 1 + (1000 - 64) // 16
    assert batch["signal"]["values"].shape == (8, frames, 33)
    assert batch["signal"]["mask"].shape == (8, frames)
    assert np.isfinite(batch["signal"]["values"]).all()


def test_tokenizer_fits_encodes_and_pickles():
    tok = WordPieceTokenizer.fit(["patient denies fever", "fever and cough", "fever, cough"], min_count=2)
    ids, mask, n = tok.encode("Fever with cuogh!", 8)
    assert n == len(tok.tokenize("Fever with cuogh!")) and mask.sum() == min(n, 8)
    assert UNK not in tok.tokenize("feevr, cuogh")  # unseen words of seen characters: no [UNK]
    assert tok.tokenize("xyz") == [UNK]  # BERT rule: an unsplittable word is one [UNK]
    assert tok.decode(tok.tokenize("fever, cough")) == "fever , cough"
    ids2, _, _ = pickle.loads(pickle.dumps(tok)).encode("Fever with cuogh!", 8)
    np.testing.assert_array_equal(ids, ids2)
    assert tok.encode("x " * 50, 4)[1].all()  # truncated to max_length


def test_bad_input_names_the_example_and_field(tiny_spec):
    check = T.CheckExample(tiny_spec.modalities, tiny_spec.select_tasks(["severity"]))
    good = {"patient_id": 7, "image": np.zeros((32, 32, 1), np.uint8), "ecg": np.zeros(1000, np.float32),
            "labs": np.full(16, np.nan, np.float32), "labels": {"severity": np.float32(1.0)}}
    check.map(dict(good))
    with pytest.raises(T.DataError, match=r"patient_id=7: field 'ecg' contains NaN"):
        check.map({**good, "ecg": np.full(1000, np.nan, np.float32)})
    with pytest.raises(T.DataError, match=r"patient_id=7: field 'image' has shape \(30, 32, 1\)"):
        check.map({**good, "image": np.zeros((30, 32, 1), np.uint8)})
    with pytest.raises(T.DataError, match=r"patient_id=7: label 'severity' is not finite"):
        check.map({**good, "labels": {"severity": np.float32(np.nan)}})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['survival'\]"):
        tiny_spec.select_tasks(["diagnosis", "survival"])
    with pytest.raises(ValueError, match="unknown modalities"):
        pipeline.preprocess_ops(tiny_spec, ["image", "xray"], tiny_spec.tasks)


def test_corrupt_and_missing_files_are_reported(tiny_builder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(str(tiny_builder.data_dir_root), root)
    builder = sources.load_builder("synthetic_patients/tiny", str(root), prepare=False)
    spec = pipeline.DatasetSpec.from_builder(builder)
    version_dir = root / "synthetic_patients" / "tiny" / str(builder.info.version)
    shard = next(p for p in version_dir.iterdir() if "test.array_record" in p.name)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4000] = b"\x00" * 4000
    shard.write_bytes(bytes(data))
    with pytest.raises(T.DataError, match=r"split 'test', record \d+ in .*cannot read or decode"):
        list(pipeline.eval_batches(builder, spec, "test", 16, shard_index=0, shard_count=1))
    shard.unlink()
    with pytest.raises(T.DataError, match=r"split 'test'"):
        list(pipeline.eval_batches(builder, spec, "test", 16, shard_index=0, shard_count=1))


def test_tensorflow_is_never_imported(tiny_builder):
    code = textwrap.dedent(f"""
        import sys
        from mmjax.data import pipeline, sources
        b = sources.load_builder("synthetic_patients/tiny", {str(tiny_builder.data_dir_root)!r})
        spec = pipeline.DatasetSpec.from_builder(b)
        it = iter(pipeline.train_loader(b, spec, 8, seed=0, shard_index=0, shard_count=1))
        next(it)
        next(pipeline.eval_batches(b, spec, "test", 8, shard_index=0, shard_count=1))
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")
                     or m == "torch" or m.startswith("torch."))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_modalities_and_tasks_are_selected_by_name(tiny_builder, tiny_spec):
    tasks = tiny_spec.select_tasks(["mortality"])
    batch = next(pipeline.eval_batches(tiny_builder, tiny_spec, "test", 8, modalities=["signal", "tabular"],
                                       tasks=tasks, shard_index=0, shard_count=1))
    assert set(batch) == {"signal", "tabular", "labels", "label_mask", "example_mask", "patient_id"}
    assert set(batch["labels"]) == set(batch["label_mask"]) == {"mortality"}
    validate_batch(batch, tasks, tiny_spec.select_modalities(["signal", "tabular"]))


# ---- Per-modality ops on hand-made specs -------------------------------------------------------------

LABS = ModalitySpec("labs", "tabular", field="vitals/labs", numeric=("crp", "sodium"), log_scale=(True, False),
                    mean=(1.0, 140.0), std=(2.0, 4.0), categorical=("ward",), categories=(("icu", "ed"),))


def _labs_example(crp, sodium=144.0, ward=3, present=True, pid=b"p-17"):
    return {"patient_id": pid, "present": {"labs": present},
            "vitals": {"labs": {"numeric": np.array([crp, sodium], np.float32),
                                "categorical": np.array([ward], np.int32)}}}


def test_standardize_tabular_logs_standardizes_masks_and_rejects_non_positive_log_values():
    op = T.StandardizeTabular(LABS)
    out = op.map(_labs_example(np.e ** 3))["out/labs"]
    np.testing.assert_allclose(out["values"], [(3.0 - 1.0) / 2.0, (144.0 - 140.0) / 4.0], rtol=1e-6)
    np.testing.assert_array_equal(out["mask"], [True, True])
    np.testing.assert_array_equal(out["categories"], [3])
    assert out["present"]
    out = op.map(_labs_example(np.nan))["out/labs"]  # not measured: masked, never imputed
    np.testing.assert_array_equal(out["mask"], [False, True])
    assert out["values"][0] == 0
    for bad in (0.0, -2.5):
        with pytest.raises(DataError, match=r"patient_id=p-17: labs column\(s\) \['crp'\] are log-scaled but <= 0"):
            op.map(_labs_example(bad))
    absent = op.map(_labs_example(0.0, present=False))["out/labs"]  # an absent modality's content is not read
    assert not absent["present"] and not absent["mask"].any()
    np.testing.assert_array_equal(absent["values"], 0)
    np.testing.assert_array_equal(absent["categories"], 0)


def _normalized(x):
    x = x - x.mean(axis=0)
    return x / (np.sqrt((x * x).mean(axis=0)) + 1e-6)


def _signal_example(x, present=True):
    return {"patient_id": 3, "present": {"ecg": present}, "ecg": x}


def test_prepare_signal_crops_the_centre_at_evaluation_and_a_random_window_in_training():
    spec = ModalitySpec("ecg", "signal", shape=(100, 2), rate=100.0)
    x = np.random.default_rng(0).normal(size=(250, 2)).astype(np.float32)

    def start_of(values):
        starts = [s for s in range(151) if np.allclose(values, _normalized(x[s:s + 100]), atol=1e-5)]
        assert len(starts) == 1, "the output is not a contiguous window of the input"
        return starts[0]

    evaluation = T.PrepareSignal(spec)
    out = evaluation.random_map(_signal_example(x), np.random.default_rng(0))["out/ecg"]
    assert out["values"].shape == (100, 2) and out["mask"].all() and out["present"]
    assert start_of(out["values"]) == 75
    assert start_of(evaluation.random_map(_signal_example(x), np.random.default_rng(1))["out/ecg"]["values"]) == 75
    training = T.PrepareSignal(spec, random_crop=True)
    starts = [start_of(training.random_map(_signal_example(x), np.random.default_rng(seed))["out/ecg"]["values"])
              for seed in range(8)]
    assert len(set(starts)) >= 4, starts
    again = [start_of(training.random_map(_signal_example(x), np.random.default_rng(seed))["out/ecg"]["values"])
             for seed in range(8)]
    assert again == starts  # seeded


def test_prepare_signal_pads_a_short_recording_with_the_mask_false():
    spec = ModalitySpec("ecg", "signal", shape=(100, 1))
    x = np.random.default_rng(1).normal(size=60).astype(np.float32)  # [T] for a single channel
    for op in (T.PrepareSignal(spec), T.PrepareSignal(spec, random_crop=True)):
        out = op.random_map(_signal_example(x), np.random.default_rng(0))["out/ecg"]
        assert out["values"].shape == (100, 1) and out["present"]
        np.testing.assert_array_equal(out["mask"], np.arange(100) < 60)
        np.testing.assert_allclose(out["values"][:60], _normalized(x[:, None]), atol=1e-5)
        np.testing.assert_array_equal(out["values"][60:], 0)
    absent = T.PrepareSignal(spec).random_map(_signal_example(x, present=False), np.random.default_rng(0))["out/ecg"]
    assert not absent["present"] and not absent["mask"].any() and not absent["values"].any()


def test_prepare_signal_evaluation_windows_cover_the_recording():
    spec = ModalitySpec("ecg", "signal", shape=(100, 2))
    x = np.random.default_rng(3).normal(size=(250, 2)).astype(np.float32)
    out = T.PrepareSignal(spec, windows=4).random_map(_signal_example(x), np.random.default_rng(0))["out/ecg"]
    assert out["values"].shape == (4, 100, 2) and out["mask"].shape == (4, 100) and out["mask"].all()
    for w, start in enumerate([0, 50, 100, 150]):  # evenly spaced, first and last at the ends
        np.testing.assert_allclose(out["values"][w], _normalized(x[start:start + 100]), atol=1e-5)
    short = T.PrepareSignal(spec, windows=3).random_map(_signal_example(x[:60]), np.random.default_rng(0))["out/ecg"]
    assert short["values"].shape == (3, 100, 2)
    np.testing.assert_array_equal(short["mask"], np.broadcast_to(np.arange(100) < 60, (3, 100)))
    np.testing.assert_allclose(short["values"][:, :60], np.broadcast_to(_normalized(x[:60]), (3, 60, 2)), atol=1e-5)
    frames = T.Spectrogram("ecg").map({"out/ecg": out})["out/ecg"]
    assert frames["values"].shape == (4, 3, 33 * 2) and frames["mask"].shape == (4, 3)
    single = T.Spectrogram("ecg").map({"out/ecg": {k: v[1] for k, v in out.items() if k != "present"}})["out/ecg"]
    np.testing.assert_allclose(frames["values"][1], single["values"], rtol=1e-6)


def test_spectrogram_of_several_channels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    mask = np.arange(300) < 250
    ex = {"out/ecg": {"values": x * mask[:, None], "mask": mask, "present": np.bool_(True)}}
    out = T.Spectrogram("ecg").map(ex)["out/ecg"]
    frames = 1 + (300 - 64) // 16
    assert out["values"].shape == (frames, 33 * 3) and out["mask"].shape == (frames,)
    real = np.array([mask[16 * f:16 * f + 64].all() for f in range(frames)])
    np.testing.assert_array_equal(out["mask"], real)
    assert out["present"] and 0 < real.sum() < frames
    per_channel = out["values"].reshape(frames, 33, 3)
    for c in range(3):
        idx = np.arange(64)[None, :] + 16 * np.arange(frames)[:, None]
        expect = np.log1p(np.abs(np.fft.rfft(x[:, c][idx] * np.hanning(64), axis=1))) * real[:, None]
        np.testing.assert_allclose(per_channel[..., c], expect, rtol=1e-4, atol=1e-4)


def test_truncation_and_length_histogram():
    counts = length_histogram([2, 2, 2, 4, 4, 5])
    assert counts == [0, 0, 3, 0, 2, 1]
    text = ModalitySpec("report", "text", vocab=("[PAD]", "[UNK]"), length_counts=counts)
    assert truncation(text, 3) == {"texts": 6, "truncated": 3, "fraction": 0.5, "max_tokens": 5,
                                   "tokens_lost_mean": pytest.approx((2 * 1 + 1 * 2) / 3)}
    assert truncation(text, 5) == {"texts": 6, "truncated": 0, "fraction": 0.0, "max_tokens": 5,
                                   "tokens_lost_mean": 0.0}
    empty = ModalitySpec("report", "text", length_counts=length_histogram([]))
    assert truncation(empty, 3) == {"texts": 0, "truncated": 0, "fraction": 0.0, "max_tokens": 0,
                                    "tokens_lost_mean": 0.0}


def test_std_has_a_floor_relative_to_the_mean():
    rng = np.random.default_rng(0)
    varied = rng.normal(5.0, 2.0, 10)
    varied[3] = np.nan
    near = np.full(10, 140.0)
    near[0] = 140.00001  # near-constant: the relative floor 1e-3 * max(|mean|, 1)
    values = np.c_[near, np.full(10, -250.0), np.full(10, 0.2), varied]
    mean, std = std_with_floor(values)
    np.testing.assert_allclose(mean, [np.mean(near), -250.0, 0.2, np.nanmean(varied)])
    # constant columns (one distinct training value) get the scale max(|mean|, 1) itself
    np.testing.assert_allclose(std, [0.14, 250.0, 1.0, np.nanstd(varied)], rtol=1e-6)
