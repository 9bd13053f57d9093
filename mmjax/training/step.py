"""The pure train and eval steps, shared by the mesh (jit) and pmap paths.

`make_train_step(..., axis_name=None)` is jitted over the global batch; with
`axis_name='data'` the same function runs under `jax.pmap` on a device's shard and reduces
counts and gradients with `psum`, which gives the same loss and update as one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from mmjax import losses
from mmjax.batch import TaskSpec
from mmjax.training.state import TrainState

# optax.tree.norm where it exists (optax.global_norm is deprecated there), else the old name.
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _reducer(axis_name):
    return (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)


def make_loss_fn(model, tasks: Sequence[TaskSpec], loss_weights=None, axis_name: str | None = None,
                 num_shards: int = 1, modality_heads_weight: float = 0.0, class_weights=None):
    """loss_fn(params, batch, rng) -> (this shard's joint loss, {task: its loss}) in train mode.
    `class_weights`: {task: per-class weights} for multiclass tasks (`losses.class_weights`)."""
    reduce = _reducer(axis_name)

    def loss_fn(params, batch, rng):
        outputs, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        per_task = losses.task_losses(outputs, batch, tasks, count_reduce=reduce, weights=class_weights)
        total = losses.combine(per_task, tasks, loss_weights, aux.get("task_log_vars"), num_shards)
        if "modality_outputs" in aux and modality_heads_weight:
            per_mod = losses.modality_task_losses(aux["modality_outputs"], aux["modality_present"], batch,
                                                  tasks, count_reduce=reduce, weights=class_weights)
            total = total + modality_heads_weight * losses.combine(per_mod, tasks, loss_weights)
        return total, per_task

    return loss_fn


def make_train_step(model, tx, tasks: Sequence[TaskSpec], loss_weights=None, axis_name: str | None = None,
                    num_shards: int = 1, modality_heads_weight: float = 0.0, class_weights=None):
    reduce = _reducer(axis_name)
    loss_fn = make_loss_fn(model, tasks, loss_weights, axis_name, num_shards, modality_heads_weight, class_weights)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        loss, per_task, grads = reduce(loss), reduce(per_task), reduce(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": _norm(grads), "param_norm": _norm(params),
                   "update_norm": _norm(updates), **{f"loss_{k}": v for k, v in per_task.items()}}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def predictions(outputs, tasks: Sequence[TaskSpec]) -> dict:
    """Model outputs -> probabilities (sigmoid; softmax over a multiclass task's classes) or values."""
    link = {"regression": lambda x: x, "multiclass": jax.nn.softmax}
    return {t.name: link.get(t.kind, jax.nn.sigmoid)(outputs[t.name]) for t in tasks}


def make_eval_step(model, tasks: Sequence[TaskSpec], windowed: Sequence[str] = ()):
    """eval_step(params, batch) -> predictions. `windowed`: signal modalities whose batch entries carry
    W evaluation windows ([B, W, T, C]); the predictions are averaged over the windows."""

    def eval_step(params, batch):
        if not windowed:
            outputs, _ = model.apply({"params": params}, batch, train=False)
            return predictions(outputs, tasks)
        num = batch[windowed[0]]["values"].shape[1]
        total = None
        for k in range(num):
            view = dict(batch)
            for m in windowed:
                view[m] = {**batch[m], "values": batch[m]["values"][:, k], "mask": batch[m]["mask"][:, k]}
            p = predictions(model.apply({"params": params}, view, train=False)[0], tasks)
            total = p if total is None else jax.tree.map(jax.numpy.add, total, p)
        return jax.tree.map(lambda x: x / num, total)

    return eval_step

