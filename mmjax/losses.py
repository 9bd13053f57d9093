"""The joint multi-task loss: masked per-task losses, combined with fixed, learned or adapted weights.

Per task: binary cross-entropy with logits (multilabel, binary; optionally with a positive-class
weight per label, as PyTorch's `BCEWithLogitsLoss(pos_weight=)`), softmax cross-entropy
(multiclass, optionally class-weighted: a weighted mean, as PyTorch's `CrossEntropyLoss(weight=)`)
or the squared error of the standardized target (regression: `((pred - y) / target_std)^2`),
averaged over the entries whose label is known (`label_mask`) on real rows (`example_mask`).
Focal loss (Lin et al., 2017), `focal_gamma > 0`, scales each classification entry by
`(1 - p_t)^gamma` (and, for sigmoid tasks, by `alpha` / `1 - alpha` on positives / negatives).

Combined (`TaskWeighting`) as `sum_t w_t * L_t` with weights from config ('fixed'); with learned
homoscedastic uncertainty (Kendall et al., 2018; 'uncertainty'): `sum_t exp(-s_t) * L_t + s_t`,
`s_t = log sigma_t^2` (regression uses 0.5 * exp(-s_t) * L_t + 0.5 * s_t); with dynamic weight
averaging (Liu et al., 2019; 'dwa': `dwa_weights`, windows of steps stand in for epochs); or
with the fixed weights and projected per-task gradients (Yu et al., 2020; 'pcgrad': `pcgrad`).
Optional per-modality auxiliary heads add `modality_heads_weight * sum_t w_t * L_t^modalities`
(`modality_task_losses`).

Every mean is a (sum, count) pair: `count_reduce` turns a shard's count into the global count
(`lax.psum` under pmap), so a sharded loss equals the single-device loss exactly; `num_shards`
spreads the uncertainty regularizer across shards so their sum counts it once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.batch import TaskSpec

SIGMOID_KINDS = ("multilabel", "binary")
TASK_WEIGHTINGS = ("fixed", "uncertainty", "dwa", "pcgrad")


def _numbers(t: TaskSpec, setting, k: int, what: str) -> np.ndarray:
    w = np.asarray([float(v) for v in setting.split(":")] if isinstance(setting, str) else setting, np.float64)
    if w.shape != (k,) or np.any(w < 0):
        raise ValueError(f"task {t.name!r}: {what} {setting!r} need {k} non-negative numbers")
    return w


def class_weights(t: TaskSpec, setting, num_train=None) -> jnp.ndarray | None:
    """Per-class weights of a multiclass task, or per-label positive weights of a multilabel or
    binary task: None (unweighted), 'balanced' or explicit numbers (a sequence, or 'w0:w1:...' text).

    multiclass 'balanced': n / (K * n_k) from the training counts (scikit-learn's rule).
    multilabel, binary 'balanced': `pos_weight = n_neg / n_pos` per label (PyTorch's
    `BCEWithLogitsLoss(pos_weight=)` convention), with `n_pos` the spec's training positives and
    `n_neg = num_train - n_pos`. The spec holds no count of *known* training labels, so
    `num_train` (the training split's size, or per-label counts where known) overstates `n_neg`
    for a task with missing labels (synthetic_patients' mortality: ~10% unknown).
    """
    if setting is None or setting == "" or setting == "none":
        return None
    k = t.num_outputs
    if t.kind == "regression":
        raise ValueError(f"class weights are for classification tasks; task {t.name!r} is regression")
    if setting != "balanced":
        return jnp.asarray(_numbers(t, setting, k, "class weights" if t.kind == "multiclass" else "positive weights"),
                           jnp.float32)
    counts = np.asarray(t.class_counts, np.float64)
    if t.kind == "multiclass":
        if counts.shape != (k,) or np.any(counts <= 0):
            raise ValueError(f"task {t.name!r}: 'balanced' class weights need a training count > 0 for each of "
                             f"the {k} classes, got {list(t.class_counts)}")
        return jnp.asarray(counts.sum() / (k * counts), jnp.float32)
    if num_train is None:
        raise ValueError(f"task {t.name!r}: 'balanced' positive weights need the number of training examples")
    negatives = np.asarray(num_train, np.float64) - counts if counts.shape == (k,) else np.zeros(k)
    if np.any(counts <= 0) or np.any(negatives <= 0):
        raise ValueError(f"task {t.name!r}: 'balanced' positive weights need training positives and negatives "
                         f"for each of the {k} labels, got positives {list(t.class_counts)} of {num_train}")
    return jnp.asarray(negatives / counts, jnp.float32)


def _log_not_true_class(logits, y):
    """log(1 - p_y) of a softmax, stable: log-sum-exp over the other classes minus over all."""
    others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def _per_entry(t: TaskSpec, pred, y, pos_weight=None, focal_gamma: float = 0.0, focal_alpha=None):
    if t.kind == "multiclass":
        pred, y = pred.astype(jnp.float32), y.astype(jnp.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(pred, y)
        return ce * jnp.exp(focal_gamma * _log_not_true_class(pred, y)) if focal_gamma else ce
    pred, y = pred.astype(jnp.float32), y.astype(jnp.float32)
    if t.kind == "regression":
        return ((pred - y) / t.target_std) ** 2
    if not focal_gamma and pos_weight is None and focal_alpha is None:
        return optax.sigmoid_binary_cross_entropy(pred, y)
    log_p, log_not_p = jax.nn.log_sigmoid(pred), jax.nn.log_sigmoid(-pred)
    pos, neg = -log_p, -log_not_p
    if focal_gamma:  # (1 - p_t)^gamma as exp(gamma * log(1 - p_t)): finite gradients for any gamma
        pos, neg = pos * jnp.exp(focal_gamma * log_not_p), neg * jnp.exp(focal_gamma * log_p)
    if pos_weight is not None:
        pos = pos * pos_weight  # [K] (multilabel) or [1] (binary), broadcast over the label axis
    if focal_alpha is not None:
        pos, neg = focal_alpha * pos, (1.0 - focal_alpha) * neg
    return y * pos + (1.0 - y) * neg


def _masked_mean_loss(t: TaskSpec, pred, y, mask, count_reduce, weights=None, focal_gamma: float = 0.0,
                      focal_alpha=None):
    """This shard's share of task t's loss averaged over the True entries of `mask`. Multiclass class
    weights weight each entry by its label's class and normalize by the weight sum; positive weights
    of a sigmoid task scale the positive term and the mean stays over entries (as PyTorch)."""
    sigmoid = t.kind in SIGMOID_KINDS
    per = _per_entry(t, pred, y, weights if sigmoid else None, focal_gamma, focal_alpha if sigmoid else None)
    w = mask.astype(jnp.float32)
    weighted_mean = weights is not None and t.kind == "multiclass"
    if weighted_mean:
        w = w * weights[jnp.clip(y.astype(jnp.int32), 0, t.num_outputs - 1)]
    count = jax.lax.stop_gradient(count_reduce(jnp.sum(w)))
    return jnp.sum(jnp.where(mask, per * w, 0.0)) / jnp.maximum(count, 1e-12 if weighted_mean else 1.0)


def _known(t: TaskSpec, batch):
    """Label known and row real: bool, the shape of the task's labels."""
    rows = batch["example_mask"]
    return batch["label_mask"][t.name] & (rows[:, None] if t.kind == "multilabel" else rows)


def task_losses(outputs, batch, tasks: Sequence[TaskSpec], count_reduce: Callable = lambda c: c,
                weights: Mapping | None = None, focal_gamma: float = 0.0, focal_alpha=None):
    """{task: this shard's share of the task's masked mean loss} (sums to the global mean);
    `weights[task]`: a task's class or positive weights (`class_weights`); `focal_gamma > 0`: focal
    loss on classification tasks, `focal_alpha` (None: off) its positive-class weight on sigmoid tasks."""
    weights = weights or {}
    return {t.name: _masked_mean_loss(t, outputs[t.name], batch["labels"][t.name], _known(t, batch), count_reduce,
                                      weights.get(t.name), focal_gamma, focal_alpha)
            for t in tasks}


def modality_task_losses(modality_outputs, modality_present, batch, tasks: Sequence[TaskSpec],
                         count_reduce: Callable = lambda c: c, weights: Mapping | None = None,
                         focal_gamma: float = 0.0, focal_alpha=None):
    """Per task, the masked mean loss of the per-modality auxiliary heads over (row, modality)
    pairs where the modality is present: `modality_outputs[task]` is `[B, M, ...]`."""
    losses = {}
    for t in tasks:
        present = modality_present[..., None] if t.kind == "multilabel" else modality_present  # [B, M(, 1)]
        mask = _known(t, batch)[:, None] & present
        labels = jnp.broadcast_to(batch["labels"][t.name][:, None], mask.shape)
        losses[t.name] = _masked_mean_loss(t, modality_outputs[t.name], labels, mask, count_reduce,
                                           (weights or {}).get(t.name), focal_gamma, focal_alpha)
    return losses


def task_terms(losses: Mapping, tasks: Sequence[TaskSpec], weights: Mapping | None = None, log_vars=None,
               num_shards: int = 1) -> list:
    """Each task's term of the joint loss: `w_t * L_t`, or the uncertainty form with `log_vars`."""
    terms = []
    for i, t in enumerate(tasks):
        if log_vars is None:
            terms.append((weights or {}).get(t.name, 1.0) * losses[t.name])
        else:
            half = 0.5 if t.kind == "regression" else 1.0
            terms.append(half * (jnp.exp(-log_vars[i]) * losses[t.name] + log_vars[i] / num_shards))
    return terms


def combine(losses: Mapping, tasks: Sequence[TaskSpec], weights: Mapping | None = None, log_vars=None,
            num_shards: int = 1):
    """The joint loss from per-task losses; fixed `weights` (default 1) or learned `log_vars`."""
    return sum(task_terms(losses, tasks, weights, log_vars, num_shards), 0.0)


# ---- Multi-task weighting: fixed, uncertainty, dynamic weight averaging, PCGrad -----------------------

@dataclasses.dataclass(frozen=True)
class TaskWeighting:
    """How the task losses are combined (see the module docstring). `dwa_window`: steps per DWA window
    (an epoch in the paper); `dwa_temperature`: T of the DWA softmax."""

    kind: str = "fixed"
    dwa_window: int = 50
    dwa_temperature: float = 2.0

    def __post_init__(self):
        if self.kind not in TASK_WEIGHTINGS:
            raise ValueError(f"unknown task_weighting {self.kind!r}; valid: {', '.join(TASK_WEIGHTINGS)}")
        if self.dwa_window < 1 or not self.dwa_temperature > 0:
            raise ValueError(f"dwa_window={self.dwa_window} must be >= 1 and dwa_temperature="
                             f"{self.dwa_temperature} > 0")


def init_loss_state(weighting: TaskWeighting, tasks: Sequence[TaskSpec]) -> dict:
    """What the weighting carries from step to step (in `TrainState.loss_state`, so it checkpoints):
    DWA's running sum of each task's loss over the current window, `[K]`, and the mean losses of the
    last two complete windows, `[2, K]` (row 0 the latest); nothing for the other weightings."""
    if weighting.kind != "dwa":
        return {}
    k = len(tasks)
    return {"dwa_window_sum": jnp.zeros((k,), jnp.float32), "dwa_window_means": jnp.zeros((2, k), jnp.float32)}


def dwa_weights(window_means, ready, temperature: float):
    """DWA (Liu et al., 2019): `w_k = K exp(r_k / T) / sum_i exp(r_i / T)`, `r_k = L_k(t-1) / L_k(t-2)`
    from the mean losses of the last two windows `[2, K]`; 1 each until two windows are complete
    (`ready` False), and r_k = 1 for a task whose earlier window mean is 0 (no known label)."""
    latest, before = window_means[0], window_means[1]
    ratio = jnp.where(before > 0, latest / jnp.where(before > 0, before, 1.0), 1.0)
    w = ratio.shape[0] * jax.nn.softmax(ratio / temperature)
    return jnp.where(ready, w, jnp.ones_like(w))


def dwa_update(loss_state: dict, losses, step, window: int) -> dict:
    """Adds step `step`'s (0-based) per-task losses `[K]` to the window; the window's last step moves its
    mean into `dwa_window_means` (the latest first) and starts a new window."""
    total = loss_state["dwa_window_sum"] + losses
    done = (step + 1) % window == 0
    means = loss_state["dwa_window_means"]
    return {"dwa_window_sum": jnp.where(done, 0.0, total),
            "dwa_window_means": jnp.where(done, jnp.stack([total / window, means[0]]), means)}


def pcgrad_coefficients(gram, orders):
    """PCGrad (Yu et al., 2020, Algorithm 1) in the span of the task gradients: with `gram[i, j] =
    g_i . g_j` (`[K, K]`) and `orders[i]` task i's random order of the tasks (`[K, K]`), returns `a` with
    `sum_i g_i^PC = sum_m a_m g_m`. Each g_i^PC starts as g_i and, for j != i in order, loses its
    component along g_j when g_i^PC . g_j < 0; it stays a combination of the g's, so the K x K Gram
    matrix is all the projection needs."""
    k = gram.shape[0]
    rows = []
    for i in range(k):
        c = jax.nn.one_hot(i, k, dtype=gram.dtype)  # g_i^PC = sum_m c_m g_m
        for p in range(k):
            j = orders[i, p]
            dot, norm2 = c @ gram[:, j], gram[j, j]
            project = (j != i) & (dot < 0) & (norm2 > 0)
            step = jnp.where(project, dot / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
            c = c - step * jax.nn.one_hot(j, k, dtype=c.dtype)
        rows.append(c)
    return jnp.sum(jnp.stack(rows), axis=0)


def pcgrad(task_grads, rng, shared=None):
    """Sum of the PCGrad-projected task gradients. `task_grads`: a pytree whose leaves are `[K, ...]` (task
    k's full gradient at index k; under pmap, already summed over devices); `rng`: draws each task's
    order; `shared`: a pytree of bools like `task_grads` (default all True). Yu et al. project the
    gradients of the shared parameters: only shared leaves enter the Gram matrix and are projected;
    a task-specific leaf (its head) gets the plain sum. Returns (the combined gradient, the number of
    task pairs whose shared gradients conflict)."""
    leaves, treedef = jax.tree.flatten(task_grads)
    mask = [True] * len(leaves) if shared is None else jax.tree.leaves(shared)
    k = leaves[0].shape[0]
    flat = [x.reshape(k, -1).astype(jnp.float32) for x, s in zip(leaves, mask) if s]
    gram = sum(f @ f.T for f in flat) if flat else jnp.zeros((k, k), jnp.float32)  # [K, K]
    orders = jax.vmap(lambda key: jax.random.permutation(key, k))(jax.random.split(rng, k))
    coef = pcgrad_coefficients(gram, orders)
    combined = [(jnp.tensordot(coef, g.astype(jnp.float32), axes=1) if s else jnp.sum(g.astype(jnp.float32), 0))
                .astype(g.dtype) for g, s in zip(leaves, mask)]
    conflicts = jnp.sum(jnp.triu(gram < 0, 1))
    return jax.tree.unflatten(treedef, combined), conflicts


def shared_parameters(params, names=("heads", "modality_heads", "task_log_vars")):
    """A pytree of bools like `params`: False for a leaf under one of `names` (a task's own head)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) in names for k in path), params)
