"""The joint multi-task loss on a hand-computed case, masks, uncertainty weighting, sharded sums; positive
weights and focal loss against numpy float64; DWA and PCGrad against hand computations; train steps with
each task weighting (PCGrad under pmap equal to one device, DWA resumed from a checkpoint)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import losses
from mmjax.batch import ModalitySpec, TaskSpec, fake_batch
from mmjax.experiment import loss_settings, task_weighting
from mmjax.models.model import MultimodalModel
from mmjax.training import checkpoint, parallel
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import create_state
from mmjax.training.step import make_train_step

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
    with pytest.raises(ValueError, match="for classification tasks; task 'sev' is regression"):
        losses.class_weights(TaskSpec("sev", "regression"), "balanced")


# ---- Positive weights (multilabel, binary) and focal loss, against numpy float64 ----------------------

DX = TaskSpec("dx", "multilabel", ("a", "b"), class_counts=(10, 30))
DEAD = TaskSpec("dead", "binary", class_counts=(20,))


def test_positive_weight_settings():
    np.testing.assert_allclose(losses.class_weights(DX, "balanced", num_train=100), [90 / 10, 70 / 30], rtol=1e-6)
    np.testing.assert_allclose(losses.class_weights(DX, "balanced", num_train=(50, 40)), [4.0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(losses.class_weights(DEAD, "balanced", num_train=100), [4.0], rtol=1e-6)
    np.testing.assert_array_equal(losses.class_weights(DX, "1:3"), [1.0, 3.0])
    np.testing.assert_array_equal(losses.class_weights(DEAD, "2.5"), [2.5])
    with pytest.raises(ValueError, match="positive weights '1:2:3' need 2 non-negative numbers"):
        losses.class_weights(DX, "1:2:3")
    with pytest.raises(ValueError, match="need the number of training examples"):
        losses.class_weights(DEAD, "balanced")
    with pytest.raises(ValueError, match="need training positives and negatives"):
        losses.class_weights(TaskSpec("dx", "multilabel", ("a", "b"), class_counts=(0, 5)), "balanced", 10)
    with pytest.raises(ValueError, match="need training positives and negatives"):
        losses.class_weights(DEAD, "balanced", num_train=20)  # no negatives


def _np_sigmoid_terms(z, y):
    log_p, log_not_p = -np.logaddexp(0, -z), -np.logaddexp(0, z)  # float64
    return log_p, log_not_p


def test_positive_weighted_bce_is_pytorchs_mean_over_entries():
    """BCEWithLogitsLoss(pos_weight=w, reduction='mean'): -(w y log p + (1 - y) log(1 - p)) averaged over the
    known entries, not normalized by the weights."""
    outputs, batch = _case()
    tasks = (DX, DEAD)
    w = {"dx": jnp.array([3.0, 0.5]), "dead": jnp.array([2.0])}
    got = losses.task_losses(outputs, batch, tasks, weights=w)
    z, y = np.asarray(outputs["dx"], np.float64), np.asarray(batch["labels"]["dx"], np.float64)
    use = np.asarray(batch["label_mask"]["dx"]) & np.asarray(batch["example_mask"])[:, None]
    log_p, log_not_p = _np_sigmoid_terms(z, y)
    per = -(np.array([3.0, 0.5]) * y * log_p + (1 - y) * log_not_p)
    assert float(got["dx"]) == pytest.approx(per[use].sum() / use.sum(), rel=1e-6)
    assert float(got["dead"]) == pytest.approx(_bce(-2.0, 0), rel=1e-6)  # its one known label is negative
    batch["labels"]["dead"] = batch["labels"]["dead"].at[0].set(1.0)
    got = losses.task_losses(outputs, batch, tasks, weights=w)
    assert float(got["dead"]) == pytest.approx(2.0 * _bce(-2.0, 1), rel=1e-6)


def _sigmoid_focal_np(z, y, gamma, alpha=None):
    """Lin et al. (2017): -alpha_t (1 - p_t)^gamma log p_t, float64."""
    p = 1 / (1 + np.exp(-z))
    p_t = np.where(y == 1, p, 1 - p)
    a_t = 1.0 if alpha is None else np.where(y == 1, alpha, 1 - alpha)
    return -a_t * (1 - p_t) ** gamma * np.log(p_t)


def _focal_case(seed=0, n=10):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2)) * 3
    y = (rng.random((n, 2)) < 0.4).astype(np.float64)
    known = rng.random((n, 2)) < 0.8
    batch = {"labels": {"dx": jnp.asarray(y, jnp.float32)}, "label_mask": {"dx": jnp.asarray(known)},
             "example_mask": jnp.ones(n, bool)}
    return {"dx": jnp.asarray(z, jnp.float32)}, batch, (z, y, known)


@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, 0.25), (2.0, 0.75), (0.0, 0.25)])
def test_sigmoid_focal_loss_matches_numpy(gamma, alpha):
    outputs, batch, (z, y, known) = _focal_case()
    got = losses.task_losses(outputs, batch, (DX,), focal_gamma=gamma, focal_alpha=alpha)["dx"]
    assert float(got) == pytest.approx(_sigmoid_focal_np(z, y, gamma, alpha)[known].mean(), rel=1e-5)
    w = np.array([3.0, 0.5])  # positive weights compose: they scale the positive term
    got = losses.task_losses(outputs, batch, (DX,), weights={"dx": jnp.asarray(w, jnp.float32)},
                             focal_gamma=gamma, focal_alpha=alpha)["dx"]
    expect = _sigmoid_focal_np(z, y, gamma, alpha) * np.where(y == 1, w, 1.0)
    assert float(got) == pytest.approx(expect[known].mean(), rel=1e-5)


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero():
    outputs, batch, (z, y, known) = _focal_case(1)
    bce = losses.task_losses(outputs, batch, (DX,))["dx"]
    assert float(bce) == pytest.approx(_sigmoid_focal_np(z, y, 0.0)[known].mean(), rel=1e-6)
    assert float(losses.task_losses(outputs, batch, (DX,), focal_gamma=0.0)["dx"]) == float(bce)
    # the focal formulas themselves (not the gamma == 0 shortcut) approach cross-entropy as gamma -> 0
    assert float(losses.task_losses(outputs, batch, (DX,), focal_gamma=1e-6)["dx"]) == pytest.approx(float(bce),
                                                                                                   rel=1e-5)
    assert float(losses.task_losses(outputs, batch, (DX,), focal_gamma=0.0, focal_alpha=0.5)["dx"]) == \
        pytest.approx(0.5 * float(bce), rel=1e-6)  # the general path at gamma 0: alpha-scaled BCE
    mc, mbatch, _ = _multiclass_case(2)
    ce = losses.task_losses(mc, mbatch, (VIEW,))["view"]
    assert float(losses.task_losses(mc, mbatch, (VIEW,), focal_gamma=1e-6)["view"]) == pytest.approx(float(ce),
                                                                                                     rel=1e-5)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_softmax_focal_loss_matches_numpy(gamma):
    outputs, batch, (logits, y, use, _, _) = _multiclass_case(0)
    logp = _log_softmax(logits)[np.arange(len(y)), y]
    per = -((1 - np.exp(logp)) ** gamma) * logp
    got = losses.task_losses(outputs, batch, (VIEW,), focal_gamma=gamma)["view"]
    assert float(got) == pytest.approx(per[use].mean(), rel=1e-5)
    w = np.array([0.5, 1.0, 3.0, 7.0])  # class weights act as the per-class alpha, a weighted mean
    got = losses.task_losses(outputs, batch, (VIEW,), weights={"view": jnp.asarray(w, jnp.float32)},
                             focal_gamma=gamma)["view"]
    assert float(got) == pytest.approx(np.sum(w[y] * per * use) / np.sum(w[y] * use), rel=1e-5)


def test_focal_gradients_stay_finite_on_confident_predictions():
    batch = {"labels": {"dx": jnp.array([[1.0, 0.0]]), "view": jnp.array([2])},
             "label_mask": {"dx": jnp.ones((1, 2), bool), "view": jnp.ones(1, bool)}, "example_mask": jnp.ones(1, bool)}

    def loss(z):
        out = {"dx": z[:, :2], "view": z}
        return sum(losses.task_losses(out, batch, (DX, VIEW), focal_gamma=0.5).values())

    g = jax.grad(loss)(jnp.array([[200.0, -200.0, 300.0, -50.0]]))  # p_t == 1 in float32 everywhere
    assert np.all(np.isfinite(np.asarray(g)))


# ---- Task weighting: DWA and PCGrad against hand computations -------------------------------------------

def test_dwa_weights_hand_computed():
    means = jnp.array([[0.5, 2.0, 1.0], [1.0, 1.0, 0.8]])  # the latest window, the one before
    r = np.array([0.5 / 1.0, 2.0 / 1.0, 1.0 / 0.8])
    for temperature in (2.0, 0.5):
        expect = 3 * np.exp(r / temperature) / np.exp(r / temperature).sum()
        np.testing.assert_allclose(losses.dwa_weights(means, True, temperature), expect, rtol=1e-6)
    np.testing.assert_array_equal(losses.dwa_weights(means, False, 2.0), [1.0, 1.0, 1.0])  # before 2 windows
    zero = jnp.array([[0.5, 0.0], [0.0, 0.0]])  # a task with no known label in the earlier window: r = 1
    np.testing.assert_allclose(losses.dwa_weights(zero, True, 2.0), [1.0, 1.0], rtol=1e-6)


def test_dwa_window_statistics_from_a_loss_history():
    history = np.array([[1.0, 4.0], [3.0, 2.0], [0.8, 3.0], [1.0, 3.4], [7.0, 7.0]])  # steps 0..4, K=2
    weighting = losses.TaskWeighting("dwa", dwa_window=2, dwa_temperature=2.0)
    state = losses.init_loss_state(weighting, (DX, DEAD))
    for step, step_losses in enumerate(history):
        state = losses.dwa_update(state, jnp.asarray(step_losses, jnp.float32), step, weighting.dwa_window)
    latest, before = history[2:4].mean(0), history[0:2].mean(0)  # windows {2, 3} and {0, 1}
    np.testing.assert_allclose(state["dwa_window_means"], [latest, before], rtol=1e-6)
    np.testing.assert_allclose(state["dwa_window_sum"], history[4], rtol=1e-6)  # step 4 opens a new window
    r = latest / before
    np.testing.assert_allclose(losses.dwa_weights(state["dwa_window_means"], True, 2.0),
                               2 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-6)


def _np_pcgrad(grads, orders):
    """Yu et al. (2020), Algorithm 1, on explicit vectors, float64."""
    out = []
    for i, g in enumerate(grads):
        g = g.copy()
        for j in orders[i]:
            if j != i and g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return np.sum(out, axis=0)


def test_pcgrad_two_tasks_hand_projected():
    # g1 . g2 = -1 < 0: g1 loses its component along g2, g2 along g1.
    g1, g2 = np.array([1.0, 1.0]), np.array([-1.0, 0.0])
    g1_pc = g1 - (-1.0 / 1.0) * g2  # (0, 1)
    g2_pc = g2 - (-1.0 / 2.0) * g1  # (-0.5, 0.5)
    tree = {"a": jnp.array([[1.0], [-1.0]]), "b": jnp.array([[1.0], [0.0]])}  # the vectors split over 2 leaves
    got, conflicts = losses.pcgrad(tree, jnp.array([0, 0], jnp.uint32))
    np.testing.assert_allclose([float(got["a"][0]), float(got["b"][0])], g1_pc + g2_pc, rtol=1e-6)
    np.testing.assert_allclose(g1_pc + g2_pc, [-0.5, 1.5])
    assert int(conflicts) == 1
    # g1 . g2 >= 0: no projection, the plain sum.
    tree = {"a": jnp.array([[1.0], [1.0]]), "b": jnp.array([[0.0], [1.0]])}
    got, conflicts = losses.pcgrad(tree, jnp.array([0, 1], jnp.uint32))
    np.testing.assert_allclose([float(got["a"][0]), float(got["b"][0])], [2.0, 1.0], rtol=1e-6)
    assert int(conflicts) == 0
    # A task's own head is not shared: it stays out of the projection (and of the conflict test) and
    # gets the plain sum; the shared leaves are projected as if the head were not there.
    tree = {"shared": jnp.array([[1.0, 1.0], [-1.0, 0.0]]), "heads": {"t0_kernel": jnp.array([[5.0], [0.0]])}}
    shared = losses.shared_parameters(tree)
    assert shared == {"shared": True, "heads": {"t0_kernel": False}}
    got, conflicts = losses.pcgrad(tree, jnp.array([0, 0], jnp.uint32), shared)
    np.testing.assert_allclose(got["shared"], g1_pc + g2_pc, rtol=1e-6)
    np.testing.assert_allclose(got["heads"]["t0_kernel"], [5.0])
    assert int(conflicts) == 1


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_three_tasks_in_random_order_matches_direct_projection(seed):
    grads = np.random.default_rng(seed).normal(size=(3, 5))
    key = jax.random.PRNGKey(seed)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(key, 3)))
    got, _ = losses.pcgrad({"w": jnp.asarray(grads, jnp.float32)}, key)
    np.testing.assert_allclose(got["w"], _np_pcgrad(grads, orders), rtol=1e-5, atol=1e-6)
    for order in ([[0, 1, 2]] * 3, [[2, 1, 0]] * 3):  # the order matters when three tasks conflict
        coef = losses.pcgrad_coefficients(jnp.asarray(grads @ grads.T, jnp.float32), jnp.asarray(order))
        np.testing.assert_allclose(np.asarray(coef) @ grads, _np_pcgrad(grads, np.array(order)), rtol=1e-5,
                                   atol=1e-6)


def test_unknown_task_weighting_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task_weighting 'gradnorm'; valid: fixed, uncertainty, dwa, pcgrad"):
        losses.TaskWeighting("gradnorm")
    loss = ml_collections.ConfigDict(dict(task_weighting="pcgrad", uncertainty_weighting=False, dwa_window=5,
                                          dwa_temperature=1.0))
    assert task_weighting(ml_collections.ConfigDict({"loss": loss})) == losses.TaskWeighting("pcgrad", 5, 1.0)
    loss.update(task_weighting="fixed", uncertainty_weighting=True)  # the older spelling still works
    assert task_weighting(ml_collections.ConfigDict({"loss": loss})).kind == "uncertainty"
    loss.task_weighting = "dwa"
    with pytest.raises(ValueError, match="conflicts with loss.task_weighting='dwa'"):
        task_weighting(ml_collections.ConfigDict({"loss": loss}))
    loss.update(task_weighting="mgda", uncertainty_weighting=False)
    with pytest.raises(ValueError, match="valid: fixed, uncertainty, dwa, pcgrad"):
        task_weighting(ml_collections.ConfigDict({"loss": loss}))


# ---- Train steps with each weighting, on a tiny tabular model ------------------------------------------

STEP_TASKS = (TaskSpec("dx", "multilabel", ("a", "b", "c")), TaskSpec("sev", "regression"),
              TaskSpec("dead", "binary"))


def _tiny(weighting, batch_size=16, tx=None):
    tab = ModalitySpec("labs", "tabular", numeric=("a", "b", "c", "d"), mean=(0.0,) * 4, std=(1.0,) * 4)
    model = MultimodalModel(modalities=("labs",), tasks=STEP_TASKS, fusion="concat", width=8, modality_heads=True,
                            encoders={"labs": {"name": "tabular", "depth": 1, "num_heads": 2}})
    batch = {k: v for k, v in fake_batch((tab,), STEP_TASKS, batch_size, seed=3).items() if k != "patient_id"}
    batch["label_mask"]["dead"][:5] = False
    config = ml_collections.ConfigDict({"loss": dict(modality_heads_weight=0.5, focal_gamma=1.0, focal_alpha=-1.0,
                                                     task_weighting=weighting.kind, dwa_window=weighting.dwa_window,
                                                     dwa_temperature=weighting.dwa_temperature)})
    kw = dict(loss_settings(config), class_weights={"dx": jnp.array([2.0, 1.0, 0.5])})
    tx = tx or make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, end_lr_factor=1.0,
                                                             weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0)), 10)
    state = create_state(model, tx, batch, jax.random.PRNGKey(0), losses.init_loss_state(weighting, STEP_TASKS))
    return model, tx, batch, state, kw


def test_pcgrad_train_step_runs_and_under_pmap_equals_one_device():
    assert jax.device_count() == 8
    # Plain SGD: the update is the gradient (Adam's first step, g / (|g| + eps), would magnify rounding in
    # gradients that are zero but for it).
    model, tx, batch, state, kw = _tiny(losses.TaskWeighting("pcgrad"), tx=optax.sgd(1.0))
    host = jax.device_get(state)
    step = jax.jit(make_train_step(model, tx, STEP_TASKS, {"sev": 0.5}, **kw), donate_argnums=0)
    s1, m1 = step(state, batch)
    pstep = jax.pmap(make_train_step(model, tx, STEP_TASKS, {"sev": 0.5}, axis_name="data", num_shards=8, **kw),
                     axis_name="data", donate_argnums=0)
    s8, m8 = pstep(parallel.replicate(host), parallel.split_for_pmap(batch))
    s8, m8 = parallel.unreplicate(s8), parallel.unreplicate(m8)
    for k in ("loss", "grad_norm", "pcgrad_conflicts", "loss_dx", "loss_sev", "loss_dead"):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=2e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), s8.params, s1.params)
    assert float(m1["pcgrad_conflicts"]) > 0  # the projection did something
    for _ in range(2):
        s1, m1 = step(s1, batch)
        assert np.isfinite(float(m1["loss"])) and np.isfinite(float(m1["grad_norm"]))
    assert step._cache_size() == 1 and int(s1.step) == 3


def test_dwa_train_step_adapts_the_weights_and_resumes_exactly(tmp_path):
    model, tx, batch, state, kw = _tiny(losses.TaskWeighting("dwa", dwa_window=2, dwa_temperature=2.0))
    step = jax.jit(make_train_step(model, tx, STEP_TASKS, {"sev": 0.5}, **kw))
    straight, history = state, []
    for _ in range(7):
        straight, metrics = step(straight, batch)
        history.append(jax.device_get(metrics))
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in history)
    assert step._cache_size() == 1
    weights = lambda m: np.array([m[f"task_weight_{t.name}"] for t in STEP_TASKS])  # noqa: E731
    task_loss = lambda m: np.array([m[f"loss_{t.name}"] for t in STEP_TASKS], np.float64)  # noqa: E731
    np.testing.assert_array_equal(weights(history[3]), 1.0)  # windows {0, 1} and {2, 3} complete after step 3
    r = (task_loss(history[2]) + task_loss(history[3])) / (task_loss(history[0]) + task_loss(history[1]))
    np.testing.assert_allclose(weights(history[4]), 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-5)
    assert not np.allclose(weights(history[4]), 1.0)

    for _ in range(3):
        state, _ = step(state, batch)
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), every=1, keep=1)
    checkpoint.save(manager, 3, state, {})
    manager.wait_until_finished()
    restored, _ = checkpoint.restore(manager, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    manager.close()
    assert np.asarray(restored.loss_state["dwa_window_sum"]).any()  # mid-window: a partial sum to carry
    for _ in range(4):
        restored, _ = step(restored, batch)
    jax.tree.map(np.testing.assert_array_equal, restored.loss_state, straight.loss_state)
    jax.tree.map(np.testing.assert_array_equal, restored.params, straight.params)
