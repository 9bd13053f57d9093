"""The Grain input pipeline: batch contract, masks, exactly-once evaluation, sharding, resume."""

import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mmjax.batch import MODALITIES, validate_batch
from mmjax.data import pipeline
from mmjax.data import transforms as T
from mmjax.data.tokenizer import UNK, WordPieceTokenizer


def _all_ids(builder, split):
    src = builder.as_data_source(split)
    return sorted(int(src[i]["patient_id"]) for i in range(len(src)))


def test_train_batches_follow_the_contract(tiny_builder, tiny_spec):
    it = iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, seed=0, shard_index=0, shard_count=1))
    batch = next(it)
    validate_batch(batch, tiny_spec.tasks)
    assert batch["image"]["values"].shape == (16, 32, 32, 1)
    assert batch["text"]["values"].dtype == np.int32 and batch["text"]["values"].shape == (16, 96)
    assert batch["tabular"]["values"].shape == (16, 16)
    assert batch["signal"]["values"].shape == (16, 1000, 1) and batch["signal"]["mask"].shape == (16, 1000)
    assert batch["labels"]["diagnosis"].shape == (16, 5)
    assert batch["example_mask"].all()
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
    j = tiny_spec.tabular_names.index("sodium")  # not log-scaled
    ok = ~np.isnan(raw[:, j])
    expect = (raw[ok, j] - tiny_spec.tabular_mean[j]) / tiny_spec.tabular_std[j]
    np.testing.assert_allclose(batch["tabular"]["values"][ok, j], expect, rtol=1e-5)


def test_statistics_come_from_the_training_split_only(tiny_builder, tiny_spec):
    def stats(split):
        src = tiny_builder.as_data_source(split)
        labs = np.stack([src[i]["labs"] for i in range(len(src))]).astype(np.float64)
        labs = np.where(tiny_spec.tabular_log_scale, np.log(labs), labs)
        return np.nanmean(labs, 0)

    np.testing.assert_allclose(tiny_spec.tabular_mean, stats("train"), rtol=1e-5)
    assert not np.allclose(tiny_spec.tabular_mean, stats("test"), rtol=1e-3)


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
    check = T.CheckExample(tiny_spec.image_shape, tiny_spec.signal_length, len(tiny_spec.tabular_names))
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
    builder = pipeline.load_builder("synthetic_patients/tiny", str(root), prepare=False)
    spec = pipeline.DatasetSpec.from_builder(builder)
    shard = next(p for p in (root / "synthetic_patients/tiny/1.0.0").iterdir() if "test.array_record" in p.name)
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
        from mmjax.data import pipeline
        b = pipeline.load_builder("synthetic_patients/tiny", {str(tiny_builder.data_dir_root)!r})
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
