"""The joint multi-task loss on a hand-computed case, masks, uncertainty weighting, sharded sums."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses
from mmjax.batch import TaskSpec

TASKS = (TaskSpec("dx", "multilabel", ("a", "b")), TaskSpec("sev", "regression"), TaskSpec("dead", "binary"))


def _bce(z, y):
    return np.log1p(np.exp(-z)) if y == 1 else np.log1p(np.exp(z))


def _case():
    outputs = {"dx": jnp.array([[2.0, -1.0], [0.5, 0.0], [9.0, 9.0]]), "sev": jnp.array([1.0, 3.0, 100.0]),
               "dead": jnp.array([-2.0, 1.0, 50.0])}
    batch = {
        "labels": {"dx": jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), "sev": jnp.array([2.0, 3.5, 0.0]),
                   "dead": jnp.array([0.0, 1.0, 0.0])},
        "label_mask": {"dx": jnp.array([[True, False], [True, True], [True, True]]),
                       "sev": jnp.array([True, True, True]), "dead": jnp.array([True, False, True])},
        "example_mask": jnp.array([True, True, False]),  # row 2 is padding: its huge errors must not count
    }
    return outputs, batch


def test_task_losses_hand_computed():
    outputs, batch = _case()
    got = losses.task_losses(outputs, batch, TASKS)
    dx = (_bce(2.0, 1) + _bce(0.5, 0) + _bce(0.0, 1)) / 3  # (0, 1) is masked, row 2 is padding
    sev = ((1.0 - 2.0) ** 2 + (3.0 - 3.5) ** 2) / 2
    dead = _bce(-2.0, 0) / 1
    assert float(got["dx"]) == pytest.approx(dx, rel=1e-6)
    assert float(got["sev"]) == pytest.approx(sev, rel=1e-6)
    assert float(got["dead"]) == pytest.approx(dead, rel=1e-6)
    total = losses.combine(got, TASKS, {"dx": 1.0, "sev": 0.5, "dead": 2.0})
    assert float(total) == pytest.approx(dx + 0.5 * sev + 2.0 * dead, rel=1e-6)
    assert float(losses.combine(got, TASKS)) == pytest.approx(dx + sev + dead, rel=1e-6)


def test_uncertainty_weighting_formula():
    outputs, batch = _case()
    got = losses.task_losses(outputs, batch, TASKS)
    s = jnp.array([0.3, -0.2, 1.0])
    total = losses.combine(got, TASKS, log_vars=s)
    expect = (np.exp(-0.3) * float(got["dx"]) + 0.3 + 0.5 * (np.exp(0.2) * float(got["sev"]) - 0.2)
              + np.exp(-1.0) * float(got["dead"]) + 1.0)
    assert float(total) == pytest.approx(expect, rel=1e-6)


def test_task_with_no_known_label_contributes_zero():
    outputs, batch = _case()
    batch["label_mask"]["dead"] = jnp.zeros(3, bool)
    assert float(losses.task_losses(outputs, batch, TASKS)["dead"]) == 0.0


def test_sharded_shares_sum_to_the_global_loss():
    outputs, batch = _case()
    full = losses.task_losses(outputs, batch, TASKS)
    s = jnp.array([0.1, 0.2, 0.3])
    shards = [slice(0, 1), slice(1, 3)]
    counts = {}
    for t in TASKS:
        m = batch["label_mask"][t.name] & (batch["example_mask"][:, None] if t.kind == "multilabel"
                                           else batch["example_mask"])
        counts[t.name] = float(jnp.sum(m))
    parts, totals = [], []
    for sl in shards:
        o = {k: v[sl] for k, v in outputs.items()}
        b = {"labels": {k: v[sl] for k, v in batch["labels"].items()},
             "label_mask": {k: v[sl] for k, v in batch["label_mask"].items()},
             "example_mask": batch["example_mask"][sl]}
        global_count = iter([counts["dx"], counts["sev"], counts["dead"]])
        part = losses.task_losses(o, b, TASKS, count_reduce=lambda c, g=global_count: jnp.asarray(next(g)))
        parts.append(part)
        totals.append(losses.combine(part, TASKS, log_vars=s, num_shards=2))
    for t in TASKS:
        assert float(sum(p[t.name] for p in parts)) == pytest.approx(float(full[t.name]), rel=1e-6)
    assert float(sum(totals)) == pytest.approx(float(losses.combine(full, TASKS, log_vars=s)), rel=1e-6)


def test_modality_head_losses_count_only_present_modalities():
    outputs, batch = _case()
    # Two modalities; modality 1 is absent for row 0, so its (wild) predictions there must not count.
    mod_out = {"dx": jnp.stack([outputs["dx"], jnp.full((3, 2), 50.0).at[1].set(outputs["dx"][1])], axis=1),
               "sev": jnp.stack([outputs["sev"], jnp.array([99.0, 3.0, 7.0])], axis=1),
               "dead": jnp.stack([outputs["dead"], jnp.array([99.0, 1.0, 0.0])], axis=1)}
    present = jnp.array([[True, False], [True, True], [True, True]])
    got = losses.modality_task_losses(mod_out, present, batch, TASKS)
    single = losses.task_losses(outputs, batch, TASKS)
    # Modality 1 equals modality 0 on row 1 and is absent on row 0; row 2 is padding.
    dx_sum = float(single["dx"]) * 3 + (_bce(0.5, 0) + _bce(0.0, 1))
    assert float(got["dx"]) == pytest.approx(dx_sum / 5, rel=1e-6)
    sev_sum = float(single["sev"]) * 2 + (3.0 - 3.5) ** 2
    assert float(got["sev"]) == pytest.approx(sev_sum / 3, rel=1e-6)
    assert float(got["dead"]) == pytest.approx(float(single["dead"]), rel=1e-6)  # row 1 'dead' label unknown


# ---- Multiclass (softmax cross-entropy, optionally class-weighted) and standardized regression ---------

VIEW = TaskSpec("view", "multiclass", ("ap", "pa", "lateral", "other"), class_counts=(50, 30, 15, 5))
STAY = TaskSpec("stay", "regression", target_mean=6.0, target_std=2.5)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _multiclass_case(seed=0, n=12):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * 2
    y = rng.integers(0, 4, n)
    y[:4] = [0, 1, 2, 3]
    known = rng.random(n) < 0.8
    known[:4] = True
    rows = np.ones(n, bool)
    rows[-2:] = False  # padding rows
    stay = rng.normal(6.0, 2.5, n)
    pred = stay + rng.normal(size=n)
    hidden = ~known | ~rows  # absurd predictions where nothing may count
    logits[hidden, y[hidden]] = -1e3
    pred[hidden] = 1e3
    batch = {"labels": {"view": jnp.asarray(y, jnp.int32), "stay": jnp.asarray(stay, jnp.float32)},
             "label_mask": {"view": jnp.asarray(known), "stay": jnp.asarray(known)},
             "example_mask": jnp.asarray(rows)}
    outputs = {"view": jnp.asarray(logits, jnp.float32), "stay": jnp.asarray(pred, jnp.float32)}
    return outputs, batch, (logits, y, known & rows, stay, pred)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_and_regression_losses_match_numpy(seed):
    outputs, batch, (logits, y, use, stay, pred) = _multiclass_case(seed)
    got = losses.task_losses(outputs, batch, (VIEW, STAY))
    ce = -_log_softmax(logits)[np.arange(len(y)), y]
    assert float(got["view"]) == pytest.approx(ce[use].mean(), rel=1e-5)
    assert float(got["stay"]) == pytest.approx((((pred - stay) / 2.5) ** 2)[use].mean(), rel=1e-5)
    w = np.array([0.5, 1.0, 3.0, 7.0])
    weighted = losses.task_losses(outputs, batch, (VIEW, STAY), weights={"view": jnp.asarray(w, jnp.float32)})
    torch_style = np.sum(w[y] * ce * use) / np.sum(w[y] * use)  # PyTorch CrossEntropyLoss(weight=w)
    assert float(weighted["view"]) == pytest.approx(torch_style, rel=1e-5)
    assert float(weighted["stay"]) == float(got["stay"])  # class weights are for the multiclass task only


def test_class_weighted_shards_sum_to_the_global_loss():
    outputs, batch, (_, y, use, _, _) = _multiclass_case(1, n=16)
    w = losses.class_weights(VIEW, "1:2:0.5:4")
    full = float(losses.task_losses(outputs, batch, (VIEW,), weights={"view": w})["view"])
    total_weight = float(np.sum(np.asarray(w)[y] * use))
    parts = []
    for sl in (slice(0, 5), slice(5, 16)):
        o = {"view": outputs["view"][sl]}
        b = {"labels": {"view": batch["labels"]["view"][sl]}, "label_mask": {"view": batch["label_mask"]["view"][sl]},
             "example_mask": batch["example_mask"][sl]}
        parts.append(float(losses.task_losses(o, b, (VIEW,), count_reduce=lambda c: jnp.asarray(total_weight),
                                              weights={"view": w})["view"]))
    assert sum(parts) == pytest.approx(full, rel=1e-5)


def test_class_weight_settings():
    from sklearn.utils.class_weight import compute_class_weight

    y_train = np.repeat(np.arange(4), VIEW.class_counts)
    np.testing.assert_allclose(losses.class_weights(VIEW, "balanced"),
                               compute_class_weight("balanced", classes=np.arange(4), y=y_train), rtol=1e-6)
    np.testing.assert_array_equal(losses.class_weights(VIEW, "1:2:0.5:4"), [1.0, 2.0, 0.5, 4.0])
    np.testing.assert_array_equal(losses.class_weights(VIEW, [1, 2, 3, 4]), [1.0, 2.0, 3.0, 4.0])
    assert losses.class_weights(VIEW, "") is None and losses.class_weights(VIEW, None) is None
    with pytest.raises(ValueError, match="need 4 non-negative numbers"):
        losses.class_weights(VIEW, "1:2")
    with pytest.raises(ValueError, match="need 4 non-negative numbers"):
        losses.class_weights(VIEW, "1:2:-1:1")
    with pytest.raises(ValueError, match="need a training count > 0"):
        losses.class_weights(TaskSpec("view", "multiclass", ("a", "b"), class_counts=(10, 0)), "balanced")
    with pytest.raises(ValueError, match="for multiclass tasks; task 'dead' is binary"):
        losses.class_weights(TaskSpec("dead", "binary"), "balanced")
