"""Self-supervised pretraining (mmjax/training/pretrain.py) and label-efficiency runs (data.label_fraction):
the masks hide what they say, the objectives equal float64 recomputations and exclude absent modalities
exactly, a pretraining run lowers its objective, resumes, and warm-starts the supervised model's encoders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.training import checkpoint
from mmjax.training import pretrain as P
from tests.test_training import smoke_config


def _signal_batch(rng, b=4, t=103, c=2):
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    time_mask = np.ones((b, t), bool)
    time_mask[1, 90:] = False  # a shorter recording
    return {"values": jnp.asarray(x), "mask": jnp.asarray(time_mask), "present": jnp.asarray([True, True, False, True])}


def test_masks_hide_the_regions_they_name_and_targets_are_the_originals():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 8, 12, 2)).astype(np.float32)
    ids = np.array([[5, 6, 7, 1, 9, 0, 0], [2, 3, 4, 5, 6, 7, 8], [4, 4, 4, 0, 0, 0, 0]], np.int32)
    batch = {"img": {"values": jnp.asarray(image), "present": jnp.asarray([True, False, True])},
             "sig": _signal_batch(rng),
             "txt": {"values": jnp.asarray(ids), "mask": jnp.asarray(ids > 0), "present": jnp.asarray([True] * 3)}}
    objs = {"img": ("image", (4, 3)), "sig": ("signal", 10), "txt": ("text", 10)}
    masked, targets = P.mask_batch(batch, objs, jax.random.PRNGKey(1), 0.5, 0.5)

    patches, hidden, _ = (np.asarray(a) for a in targets["img"])
    assert patches.shape == (3, 8, 24) and hidden.shape == (3, 8)
    assert not hidden[1].any() and hidden.any()  # an absent image hides nothing
    out = np.asarray(masked["img"]["values"])
    for b in range(3):
        for k in range(8):
            r, q = divmod(k, 4)
            region = image[b, 4 * r:4 * r + 4, 3 * q:3 * q + 3]
            np.testing.assert_array_equal(patches[b, k], region.reshape(-1))
            np.testing.assert_array_equal(out[b, 4 * r:4 * r + 4, 3 * q:3 * q + 3], 0 if hidden[b, k] else region)

    segments, hidden, valid = (np.asarray(a) for a in targets["sig"])
    x = np.asarray(batch["sig"]["values"])
    assert segments.shape == (4, 11, 20) and not hidden[2].any()  # 103 steps: 11 segments, the last padded
    np.testing.assert_array_equal(segments[0, 3], x[0, 30:40].reshape(-1))
    np.testing.assert_array_equal(valid[0, 10], np.repeat(np.arange(10) < 3, 2))  # the padded tail weighs 0
    assert not hidden[1, 9:].any()  # segments past a short recording's end are never targets
    out = np.asarray(masked["sig"]["values"])
    for b in range(4):
        steps = np.repeat(hidden[b], 10)[:103]
        np.testing.assert_array_equal(out[b][steps], 0)
        np.testing.assert_array_equal(out[b][~steps], x[b][~steps])

    target, hidden, _ = (np.asarray(a) for a in targets["txt"])
    np.testing.assert_array_equal(target, ids)
    assert not hidden[ids < 2].any() and hidden.any()  # [PAD] and [UNK] are never targets
    np.testing.assert_array_equal(np.asarray(masked["txt"]["values"]), np.where(hidden, P.UNK_ID, ids))


def test_objectives_follow_each_encoders_tokens(tiny_builder):
    """The regions come from the encoder's own stride, checked against its token count: a signal whose
    length is no multiple of the patch (its last token covers a shorter tail) and the ResNet's strides."""
    from mmjax.experiment import Experiment

    config = smoke_config(tiny_builder)
    exp = Experiment.from_config(config)
    template = P._inputs(exp.template_batch(), exp.modalities)
    assert P.objectives(exp, template)["signal"] == ("signal", config.model.signal.patch_size)
    assert P.objectives(exp, template)["image"] == ("image", (config.model.image.patch_size,) * 2)
    longer = dict(template, signal=dict(template["signal"]))
    t = template["signal"]["values"].shape[1] + 10  # 1010 steps, patches of 50: 21 tokens, the last of 10 steps
    longer["signal"]["values"] = jnp.zeros((1, t, template["signal"]["values"].shape[-1]))
    longer["signal"]["mask"] = jnp.ones((1, t), bool)
    assert P.objectives(exp, longer)["signal"] == ("signal", 50)
    config.model.signal.update(encoder="resnet1d", stages="small")
    assert P.objectives(Experiment.from_config(config), template)["signal"] == ("signal", 16)


def _info_nce(za, zb, temperature):
    """CLIP's symmetric InfoNCE in float64 over the rows given."""
    logits = za @ zb.T / temperature
    row = np.log(np.exp(logits).sum(1)) - np.diag(logits)
    col = np.log(np.exp(logits).sum(0)) - np.diag(logits)
    return float(np.mean(0.5 * (row + col)))


def test_contrastive_loss_equals_float64_infonce_over_the_patients_with_both_modalities():
    rng = np.random.default_rng(3)
    z = {m: rng.standard_normal((6, 5)) for m in "abc"}
    z = {m: v / np.linalg.norm(v, axis=1, keepdims=True) for m, v in z.items()}
    present = {"a": np.array([1, 1, 1, 1, 1, 1], bool), "b": np.array([1, 0, 1, 1, 0, 1], bool),
               "c": np.array([0, 0, 0, 1, 0, 0], bool)}  # one patient with c: pairs with c count for nothing
    loss, acc = P.contrastive_loss({m: jnp.asarray(v, jnp.float32) for m, v in z.items()},
                                   {m: jnp.asarray(v) for m, v in present.items()}, 0.2)
    both = present["a"] & present["b"]
    expected = _info_nce(z["a"][both], z["b"][both], 0.2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    hits = np.argmax(z["a"][both] @ z["b"][both].T, axis=1) == np.arange(both.sum())
    np.testing.assert_allclose(float(acc), hits.mean(), rtol=1e-6)
    garbage = dict(z, b=np.where(both[:, None], z["b"], 7.0))  # what an absent row holds changes nothing
    again, _ = P.contrastive_loss({m: jnp.asarray(v, jnp.float32) for m, v in garbage.items()},
                                  {m: jnp.asarray(v) for m, v in present.items()}, 0.2)
    assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_masked_losses_equal_float64_on_the_hidden_regions():
    rng = np.random.default_rng(4)
    pred, target = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    hidden = np.array([[1, 0, 1], [0, 0, 1]], bool)
    weights = np.ones((2, 3, 4))
    weights[1, 2, 3] = 0  # a padded element
    logits, ids = rng.standard_normal((2, 3, 6)), rng.integers(2, 6, (2, 3))
    out = {"s": {"reconstruction": jnp.asarray(pred, jnp.float32)},
           "t": {"reconstruction": jnp.asarray(logits, jnp.float32)}}
    got = P.masked_losses(out, {"s": (jnp.asarray(target), jnp.asarray(hidden), jnp.asarray(weights)),
                                "t": (jnp.asarray(ids), jnp.asarray(hidden), None)})
    per = [(np.square(pred - target)[b, k] * weights[b, k]).sum() / weights[b, k].sum()
           for b, k in zip(*np.nonzero(hidden))]
    np.testing.assert_allclose(float(got["s"]), np.mean(per), rtol=1e-5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, k, ids[b, k]] for b, k in zip(*np.nonzero(hidden))]
    np.testing.assert_allclose(float(got["t"]), np.mean(nll), rtol=1e-5)


def test_label_rows_are_a_seeded_nested_subset():
    assert pipeline.label_rows(100, 1.0, 0) is None
    small, large = pipeline.label_rows(100, 0.1, 0), pipeline.label_rows(100, 0.5, 0)
    assert len(small) == 10 and len(large) == 50 and set(small) <= set(large)
    assert np.all(np.diff(small) > 0) and len(pipeline.label_rows(100, 0.001, 0)) == 1
    assert not np.array_equal(small, pipeline.label_rows(100, 0.1, 1))
    with pytest.raises(ValueError, match="label_fraction"):
        pipeline.label_rows(100, 0.0, 0)


def test_a_label_fraction_trains_on_its_rows_only(tiny_builder):
    from mmjax.experiment import Experiment

    config = smoke_config(tiny_builder)
    config.data.label_fraction = 0.25
    exp = Experiment.from_config(config)
    rows = exp.train_rows
    source = pipeline.CheckedSource(exp.builder, "train")
    wanted = {source[int(i)]["patient_id"] for i in rows}
    wanted = {p.decode() if isinstance(p, bytes) else str(p) for p in wanted}
    assert len(rows) == round(0.25 * len(source))
    seen = set()
    for _, batch in zip(range(6), exp.train_loader(16)):
        seen |= set(map(str, batch["patient_id"]))
    assert seen == wanted  # every labelled row, and no other


@pytest.fixture(scope="module")
def pretrained(tiny_builder, tmp_path_factory):
    config = smoke_config(tiny_builder)
    config.pretrain.update(num_steps=12, log_every=4, checkpoint_every=6, batch_size=16)
    workdir = str(tmp_path_factory.mktemp("pre") / "p")
    config.pretrain.num_steps = 6
    P.pretrain(config, workdir)  # stopped at 6, then continued to 12: a resumed pretraining
    config.pretrain.num_steps = 12
    record = P.pretrain(config, workdir)
    return config, workdir, record


def test_pretraining_lowers_its_objective_and_resumes(pretrained, tiny_builder, capsys):
    config, workdir, record = pretrained
    assert record["steps"] == 12
    from mmjax.console import ConfigError

    for key, value, named in (("model.width", 48, "model.width"), ("pretrain.mask_ratio", 0.3, "pretrain.mask_ratio")):
        other = config.copy_and_resolve_references()
        group, _, field = key.rpartition(".")
        other[group][field] = value
        with pytest.raises(ConfigError, match=named):  # a resume with another config is refused, naming it
            P.pretrain(other, workdir)
    assert record["objectives"] == {"image": "image", "text": "text", "tabular": None, "signal": "signal"}
    saved = json.load(open(os.path.join(workdir, P.PRETRAIN_FILE)))
    assert saved["encoders"] == ["image_encoder", "text_encoder", "tabular_encoder", "signal_encoder"]
    events = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [e["step"] for e in events if e["event"] == "pretrain"]
    assert steps == [4, 6, 8, 12]  # the resumed run logged each step once (6: the last of the first part)
    # the objective on validation, same masks: the pretrained encoders against freshly initialized ones
    from mmjax.experiment import Experiment

    exp = Experiment.from_config(config)
    p = P.settings(config)
    model, objs = P.build(exp, p)
    objective = P.make_objective(model, objs, p)
    fresh = model.init({"params": jax.random.PRNGKey(config.seed)}, P._inputs(exp.template_batch(), exp.modalities))
    from mmjax.training import parallel

    before = P.evaluate(exp, parallel.make_strategy("mesh"), objective, fresh["params"])
    assert record["validation"]["loss"] < before["loss"] - 0.5, (before, record["validation"])


def test_a_supervised_run_warm_starts_every_shared_encoder(pretrained, tmp_path, capsys):
    from mmjax.training.train import init_or_restore

    config, workdir, _ = pretrained
    config = config.copy_and_resolve_references()
    config.init_from = workdir
    config.modalities = "image+signal"  # a model with two of the four pretrained encoders
    run = init_or_restore(config, str(tmp_path / "w"))
    run.manager.close()
    assert "Initialized image_encoder, signal_encoder (" in capsys.readouterr().out
    pretrained_config = pretrained[0]
    from mmjax.experiment import Experiment

    exp = Experiment.from_config(pretrained_config)
    model, _ = P.build(exp, P.settings(pretrained_config))
    template = P._inputs(exp.template_batch(), exp.modalities)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), template)["params"])
    pre, step = checkpoint.restore_params(workdir, abstract)
    assert step == 12
    for name in ("image_encoder", "signal_encoder"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state.params[name]), pre[name])
    with pytest.raises(ValueError, match="none of them"):
        P.shared_encoders(workdir, {"fusion": None})
    # a supervised run whose signal encoder differs (as the small-data recipe would make it): refused, naming it
    recorded = json.load(open(os.path.join(workdir, P.PRETRAIN_FILE)))["encoder_settings"]["signal_encoder"]
    other = {"signal": {**recorded, "name": "resnet1d"}}
    with pytest.raises(ValueError, match="signal_encoder was pretrained with other settings.*name: 'signal' -> "
                                         "'resnet1d'.*--config.recipe"):
        P.shared_encoders(workdir, {"signal_encoder": None}, other)
    assert P.shared_encoders(workdir, {"signal_encoder": None}, {"signal": recorded})



def test_the_label_efficiency_table_pairs_the_arms_by_seed():
    from mmjax.training import label_efficiency as le

    rows = [{"fraction": f, "seed": s, "arm": arm, "train_rows": int(100 * f), "test": v, "baseline": b,
             "baseline_name": "x", "wall_s": 1.0}
            for f, s, arm, v, b in [(0.1, 0, "scratch", 0.70, 0.60), (0.1, 0, "pretrained", 0.80, 0.60),
                                    (0.1, 1, "scratch", 0.60, 0.70), (0.1, 1, "pretrained", 0.65, 0.70),
                                    (1.0, 0, "scratch", 0.90, 0.85), (1.0, 0, "pretrained", 0.89, 0.85)]]
    first, second = le.summary(rows)
    assert first["fraction"] == 0.1 and first["train_rows"] == 10 and first["seeds"] == 2
    np.testing.assert_allclose(first["gains"], [0.10, 0.05])
    np.testing.assert_allclose(first["gain"], (0.075, np.std([0.10, 0.05], ddof=1)))
    np.testing.assert_allclose(first["scratch"], (0.65, np.std([0.7, 0.6], ddof=1)))
    np.testing.assert_allclose(first["baseline"][0], 0.65)
    assert second["gains"] == pytest.approx([-0.01]) and second["gain"][1] == 0.0
    table = le.markdown(rows, "macro_auroc")
    assert "| 0.1 | 10 | 0.650 ± 0.071 | 0.725 ± 0.106 | +0.075 (+0.100 +0.050) | 0.650 ± 0.071 |" in table
