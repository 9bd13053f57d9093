"""The joint multi-task loss: masked per-task losses, combined with fixed or learned weights.

Per task: binary cross-entropy with logits (multilabel, binary), softmax cross-entropy
(multiclass, optionally class-weighted: a weighted mean, as PyTorch's `CrossEntropyLoss(weight=)`)
or the squared error of the standardized target (regression: `((pred - y) / target_std)^2`),
averaged over the entries whose label is known (`label_mask`) on real rows (`example_mask`).
Combined as `sum_t w_t * L_t` with weights from config, or with learned homoscedastic
uncertainty (Kendall et al., 2018): `sum_t exp(-s_t) * L_t + s_t`, `s_t = log sigma_t^2`
(regression uses 0.5 * exp(-s_t) * L_t + 0.5 * s_t). Optional per-modality auxiliary heads add
`modality_heads_weight * sum_t w_t * L_t^modalities` (`modality_task_losses`).

Every mean is a (sum, count) pair: `count_reduce` turns a shard's count into the global count
(`lax.psum` under pmap), so a sharded loss equals the single-device loss exactly; `num_shards`
spreads the uncertainty regularizer across shards so their sum counts it once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.batch import TaskSpec


def class_weights(t: TaskSpec, setting) -> jnp.ndarray | None:
    """Per-class weights of a multiclass task: None (unweighted), 'balanced' (n / (K * n_k) from the
    training counts, scikit-learn's rule) or explicit numbers (a sequence, or 'w0:w1:...' text)."""
    if setting is None or setting == "" or setting == "none":
        return None
    if t.kind != "multiclass":
        raise ValueError(f"class weights are for multiclass tasks; task {t.name!r} is {t.kind}")
    k = t.num_outputs
    if setting == "balanced":
        counts = np.asarray(t.class_counts, np.float64)
        if counts.shape != (k,) or np.any(counts <= 0):
            raise ValueError(f"task {t.name!r}: 'balanced' class weights need a training count > 0 for each of "
                             f"the {k} classes, got {list(t.class_counts)}")
        w = counts.sum() / (k * counts)
    else:
        w = np.asarray([float(v) for v in setting.split(":")] if isinstance(setting, str) else setting, np.float64)
        if w.shape != (k,) or np.any(w < 0):
            raise ValueError(f"task {t.name!r}: class weights {setting!r} need {k} non-negative numbers")
    return jnp.asarray(w, jnp.float32)


def _per_entry(t: TaskSpec, pred, y):
    if t.kind == "multiclass":
        return optax.softmax_cross_entropy_with_integer_labels(pred.astype(jnp.float32), y.astype(jnp.int32))
    pred, y = pred.astype(jnp.float32), y.astype(jnp.float32)
    if t.kind == "regression":
        return ((pred - y) / t.target_std) ** 2
    return optax.sigmoid_binary_cross_entropy(pred, y)


def _masked_mean_loss(t: TaskSpec, pred, y, mask, count_reduce, weights=None):
    """This shard's share of task t's loss averaged over the True entries of `mask` (weighted by the
    label's class weight, when given)."""
    per = _per_entry(t, pred, y)
    w = mask.astype(jnp.float32)
    if weights is not None:
        w = w * weights[jnp.clip(y.astype(jnp.int32), 0, t.num_outputs - 1)]
    count = jax.lax.stop_gradient(count_reduce(jnp.sum(w)))
    return jnp.sum(jnp.where(mask, per * w, 0.0)) / jnp.maximum(count, 1e-12 if weights is not None else 1.0)


def _known(t: TaskSpec, batch):
    """Label known and row real: bool, the shape of the task's labels."""
    rows = batch["example_mask"]
    return batch["label_mask"][t.name] & (rows[:, None] if t.kind == "multilabel" else rows)


def task_losses(outputs, batch, tasks: Sequence[TaskSpec], count_reduce: Callable = lambda c: c,
                weights: Mapping | None = None):
    """{task: this shard's share of the task's masked mean loss} (sums to the global mean);
    `weights[task]`: class weights of a multiclass task (`class_weights`)."""
    weights = weights or {}
    return {t.name: _masked_mean_loss(t, outputs[t.name], batch["labels"][t.name], _known(t, batch), count_reduce,
                                      weights.get(t.name))
            for t in tasks}


def modality_task_losses(modality_outputs, modality_present, batch, tasks: Sequence[TaskSpec],
                         count_reduce: Callable = lambda c: c, weights: Mapping | None = None):
    """Per task, the masked mean loss of the per-modality auxiliary heads over (row, modality)
    pairs where the modality is present: `modality_outputs[task]` is `[B, M, ...]`."""
    losses = {}
    for t in tasks:
        present = modality_present[..., None] if t.kind == "multilabel" else modality_present  # [B, M(, 1)]
        mask = _known(t, batch)[:, None] & present
        labels = jnp.broadcast_to(batch["labels"][t.name][:, None], mask.shape)
        losses[t.name] = _masked_mean_loss(t, modality_outputs[t.name], labels, mask, count_reduce,
                                           (weights or {}).get(t.name))
    return losses


def combine(losses: Mapping, tasks: Sequence[TaskSpec], weights: Mapping | None = None, log_vars=None,
            num_shards: int = 1):
    """The joint loss from per-task losses; fixed `weights` (default 1) or learned `log_vars`."""
    total = 0.0
    for i, t in enumerate(tasks):
        if log_vars is None:
            total = total + (weights or {}).get(t.name, 1.0) * losses[t.name]
        else:
            half = 0.5 if t.kind == "regression" else 1.0
            total = total + half * (jnp.exp(-log_vars[i]) * losses[t.name] + log_vars[i] / num_shards)
    return total
