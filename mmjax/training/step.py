"""The pure train and eval steps, shared by the mesh (jit) and pmap paths.

`make_train_step(..., axis_name=None)` is jitted over the global batch; with
`axis_name='data'` the same function runs under `jax.pmap` on a device's shard and reduces
counts and gradients with `psum`, which gives the same loss and update as one device (with
PCGrad, each task's gradient is summed over devices before the projection, for the same reason).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from mmjax import losses
from mmjax.batch import TaskSpec
from mmjax.training.state import TrainState

# optax.tree.norm where it exists (optax.global_norm is deprecated there), else the old name.
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _reducer(axis_name):
    return (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)


def _loss_fns(model, tasks, loss_weights, axis_name, num_shards, modality_heads_weight, class_weights, focal_gamma,
              focal_alpha):
    """(loss_fn, objectives): the joint loss, and the `[K]` vector of each task's term of it (PCGrad)."""
    reduce = _reducer(axis_name)
    kw = dict(count_reduce=reduce, weights=class_weights, focal_gamma=focal_gamma, focal_alpha=focal_alpha)

    def parts(params, batch, rng, task_scale):
        outputs, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        per_task = losses.task_losses(outputs, batch, tasks, **kw)
        per_mod = None
        if "modality_outputs" in aux and modality_heads_weight:
            per_mod = losses.modality_task_losses(aux["modality_outputs"], aux["modality_present"], batch, tasks,
                                                  **kw)
        weights = loss_weights
        if task_scale is not None:  # DWA's weights [K] times the fixed ones
            weights = {t.name: (loss_weights or {}).get(t.name, 1.0) * task_scale[i] for i, t in enumerate(tasks)}
        return per_task, per_mod, weights, aux.get("task_log_vars")

    def loss_fn(params, batch, rng, task_scale=None):
        per_task, per_mod, weights, log_vars = parts(params, batch, rng, task_scale)
        total = losses.combine(per_task, tasks, weights, log_vars, num_shards)
        if per_mod is not None:
            total = total + modality_heads_weight * losses.combine(per_mod, tasks, weights)
        return total, per_task

    def objectives(params, batch, rng):
        per_task, per_mod, weights, log_vars = parts(params, batch, rng, None)
        terms = jnp.stack(losses.task_terms(per_task, tasks, weights, log_vars, num_shards))
        if per_mod is not None:  # a task's auxiliary heads belong to its term
            terms = terms + modality_heads_weight * jnp.stack(losses.task_terms(per_mod, tasks, weights))
        return terms, per_task

    return loss_fn, objectives


def make_loss_fn(model, tasks: Sequence[TaskSpec], loss_weights=None, axis_name: str | None = None,
                 num_shards: int = 1, modality_heads_weight: float = 0.0, class_weights=None,
                 focal_gamma: float = 0.0, focal_alpha=None):
    """loss_fn(params, batch, rng, task_scale=None) -> (this shard's joint loss, {task: its loss}) in train
    mode. `class_weights`: {task: class or positive weights} (`losses.class_weights`); `task_scale`: `[K]`
    factors on the fixed task weights (DWA)."""
    return _loss_fns(model, tasks, loss_weights, axis_name, num_shards, modality_heads_weight, class_weights,
                     focal_gamma, focal_alpha)[0]


def step_keys(state: TrainState, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(the step's key, the same on every device; the key of the model's dropout and modality dropout).
    Under pmap (`axis_name`) each device holds other examples, so the dropout key folds in the device's
    index: otherwise every device would draw the same masks, row by row. Jitted over a mesh the model
    draws for the global batch at once, and the two keys are one."""
    key = jax.random.fold_in(state.rng, state.step)
    return key, (jax.random.fold_in(key, jax.lax.axis_index(axis_name)) if axis_name else key)


def make_train_step(model, tx, tasks: Sequence[TaskSpec], loss_weights=None, axis_name: str | None = None,
                    num_shards: int = 1, modality_heads_weight: float = 0.0, class_weights=None,
                    task_weighting: losses.TaskWeighting | str = "fixed", focal_gamma: float = 0.0,
                    focal_alpha=None):
    """train_step(state, batch) -> (state, metrics). `task_weighting`: 'fixed' and 'uncertainty' (the
    model's `task_log_vars`) differentiate the joint loss; 'dwa' scales the fixed weights by DWA's
    (`state.loss_state` carries the window statistics); 'pcgrad' takes each task's gradient (one
    forward pass, K backward passes under vmap), sums them over devices under pmap, then projects."""
    weighting = losses.TaskWeighting(task_weighting) if isinstance(task_weighting, str) else task_weighting
    reduce = _reducer(axis_name)
    loss_fn, objectives = _loss_fns(model, tasks, loss_weights, axis_name, num_shards, modality_heads_weight,
                                    class_weights, focal_gamma, focal_alpha)

    def train_step(state: TrainState, batch):
        key, rng = step_keys(state, axis_name)
        extra = {}
        if weighting.kind == "pcgrad":
            terms, task_vjp, per_task = jax.vjp(lambda p: objectives(p, batch, rng), state.params, has_aux=True)
            (task_grads,) = jax.vmap(task_vjp)(jnp.eye(len(tasks), dtype=terms.dtype))  # leaves [K, ...]
            terms, per_task, task_grads = reduce(terms), reduce(per_task), reduce(task_grads)
            # The projection order comes from the step's key, folded apart from dropout's use of it.
            grads, extra["pcgrad_conflicts"] = losses.pcgrad(task_grads, jax.random.fold_in(key, 0x5C),
                                                              losses.shared_parameters(state.params))
            loss = jnp.sum(terms)
        else:
            scale = None
            if weighting.kind == "dwa":
                if "dwa_window_means" not in state.loss_state:
                    raise ValueError("task_weighting='dwa' needs the state's loss_state from "
                                     "losses.init_loss_state (create_state(..., loss_state=...))")
                ready = state.step >= 2 * weighting.dwa_window
                scale = losses.dwa_weights(state.loss_state["dwa_window_means"], ready, weighting.dwa_temperature)
                extra.update({f"task_weight_{t.name}": scale[i] for i, t in enumerate(tasks)})
            (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, scale)
            loss, per_task, grads = reduce(loss), reduce(per_task), reduce(grads)
        loss_state = state.loss_state
        if weighting.kind == "dwa":  # the per-task losses are global here (after psum), as the weights need
            loss_state = losses.dwa_update(loss_state, jnp.stack([per_task[t.name] for t in tasks]), state.step,
                                           weighting.dwa_window)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": _norm(grads), "param_norm": _norm(params),
                   "update_norm": _norm(updates), **{f"loss_{k}": v for k, v in per_task.items()}, **extra}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=loss_state), metrics

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

