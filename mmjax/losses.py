"""The joint multi-task loss: masked per-task losses, combined with fixed or learned weights.

Per task: binary cross-entropy with logits (multilabel, binary) or squared error (regression),
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
import optax

from mmjax.batch import TaskSpec


def _masked_mean_loss(t: TaskSpec, pred, y, mask, count_reduce):
    """This shard's share of task t's loss averaged over the True entries of `mask`."""
    pred, y = pred.astype(jnp.float32), y.astype(jnp.float32)
    per = (pred - y) ** 2 if t.kind == "regression" else optax.sigmoid_binary_cross_entropy(pred, y)
    count = jax.lax.stop_gradient(count_reduce(jnp.sum(mask.astype(jnp.float32))))
    return jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(count, 1.0)


def _known(t: TaskSpec, batch):
    """Label known and row real: bool, the shape of the task's labels."""
    rows = batch["example_mask"]
    return batch["label_mask"][t.name] & (rows[:, None] if t.kind == "multilabel" else rows)


def task_losses(outputs, batch, tasks: Sequence[TaskSpec], count_reduce: Callable = lambda c: c):
    """{task: this shard's share of the task's masked mean loss} (sums to the global mean)."""
    return {t.name: _masked_mean_loss(t, outputs[t.name], batch["labels"][t.name], _known(t, batch), count_reduce)
            for t in tasks}


def modality_task_losses(modality_outputs, modality_present, batch, tasks: Sequence[TaskSpec],
                         count_reduce: Callable = lambda c: c):
    """Per task, the masked mean loss of the per-modality auxiliary heads over (row, modality)
    pairs where the modality is present: `modality_outputs[task]` is `[B, M, ...]`."""
    losses = {}
    for t in tasks:
        present = modality_present[..., None] if t.kind == "multilabel" else modality_present  # [B, M(, 1)]
        mask = _known(t, batch)[:, None] & present
        losses[t.name] = _masked_mean_loss(t, modality_outputs[t.name], batch["labels"][t.name][:, None], mask,
                                           count_reduce)
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
