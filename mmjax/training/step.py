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
tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _reducer(axis_name):
    return (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)


def _loss_fns(model, tasks, loss_weights, count_reduce, num_shards, modality_heads_weight, class_weights, focal_gamma,
              focal_alpha):
    """(loss_fn, objectives): the joint loss, and the `[K]` vector of each task's term of it (PCGrad).
    `count_reduce`: a shard's label count -> the count of the whole batch (each mean's denominator)."""
    kw = dict(count_reduce=count_reduce, weights=class_weights, focal_gamma=focal_gamma, focal_alpha=focal_alpha)

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
    return _loss_fns(model, tasks, loss_weights, _reducer(axis_name), num_shards, modality_heads_weight,
                     class_weights, focal_gamma, focal_alpha)[0]


def step_keys(state: TrainState, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(the step's key, the same on every device; the key of the model's dropout and modality dropout).
    Under pmap (`axis_name`) each device holds other examples, so the dropout key folds in the device's
    index: otherwise every device would draw the same masks, row by row. Jitted over a mesh the model
    draws for the global batch at once, and the two keys are one."""
    key = jax.random.fold_in(state.rng, state.step)
    return key, (jax.random.fold_in(key, jax.lax.axis_index(axis_name)) if axis_name else key)


def microbatches(batch, k: int):
    """[B, ...] -> [k, B / k, ...], microbatch j holding rows j, j + k, j + 2k, ...: a device's contiguous
    rows of a sharded batch split alike, so no row moves between devices."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into accum_steps={k} microbatches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _accumulate(contributions, params, batch, rng, k: int, reduce):
    """The sums over `k` microbatches of `contributions(params, microbatch, rng, count_reduce)` (a loss or
    the task terms, the per-task losses, the gradients), equal to one pass over the whole batch.

    Each mean's denominator must be the whole batch's count, known before any microbatch's loss: a first
    pass records every count a microbatch's loss takes (in the order the loss asks for them: labels,
    then the masks of the model's own, e.g. after modality dropout), summed over the microbatches and
    `reduce`d over devices; XLA keeps of that pass only what the counts need, not the model's arithmetic.
    The second pass replays the totals in the same order while it sums the microbatches' gradients."""
    parts = microbatches(batch, k)
    keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))

    def counts(x):
        seen = []
        contributions(params, x[0], x[1], lambda c: seen.append(c) or c)
        return jnp.stack(seen)

    totals = reduce(jnp.sum(jax.lax.map(counts, (parts, keys)), axis=0))

    def body(acc, x):
        order = iter(range(totals.shape[0]))
        out = contributions(params, x[0], x[1], lambda c: totals[next(order)])
        return jax.tree.map(jnp.add, acc, out), None

    first = jax.tree.map(lambda a: a[0], parts)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(lambda: contributions(params, first, rng, lambda c: c)))
    return jax.lax.scan(body, zeros, (parts, keys))[0]


def make_train_step(model, tx, tasks: Sequence[TaskSpec], loss_weights=None, axis_name: str | None = None,
                    num_shards: int = 1, modality_heads_weight: float = 0.0, class_weights=None,
                    task_weighting: losses.TaskWeighting | str = "fixed", focal_gamma: float = 0.0,
                    focal_alpha=None, accum_steps: int = 1, dp_clip: float | None = None, dp_microbatch: int = 0):
    """train_step(state, batch) -> (state, metrics). `task_weighting`: 'fixed' and 'uncertainty' (the
    model's `task_log_vars`) differentiate the joint loss; 'dwa' scales the fixed weights by DWA's
    (`state.loss_state` carries the window statistics); 'pcgrad' takes each task's gradient (one
    forward pass, K backward passes under vmap), sums them over devices under pmap, then projects.
    `accum_steps` = k > 1: the batch in k microbatches, their gradients summed before the one update
    (the same loss and update as the whole batch at a k-th of the activation memory; dropout and
    modality dropout draw other masks, from a key per microbatch).
    `dp_clip` = C (DP-SGD, `mmjax/training/privacy.py`): the gradients are the sum over the batch's rows of
    each row's gradient of its own loss clipped to L2 norm C (`jax_privacy.clipped_grad`, vmapped over rows,
    `dp_microbatch` rows at a time if > 0; each row's own dropout key); padding rows (`example_mask`
    False) have no known label, so no loss and no gradient. The optimizer adds the noise and divides by
    the expected batch size; the logged losses are the means over the real rows."""
    weighting = losses.TaskWeighting(task_weighting) if isinstance(task_weighting, str) else task_weighting
    reduce = _reducer(axis_name)
    settings = (modality_heads_weight, class_weights, focal_gamma, focal_alpha)

    def contributions(params, batch, rng, scale, count_reduce, shards):
        """What is summed over devices (and microbatches): the loss, or PCGrad's task terms; the
        per-task losses; the gradients, or each task's."""
        loss_fn, objectives = _loss_fns(model, tasks, loss_weights, count_reduce, shards, *settings)
        if dp_clip is not None:
            return _clipped(loss_fn, params, batch, rng, scale)
        if weighting.kind == "pcgrad":
            terms, task_vjp, per_task = jax.vjp(lambda p: objectives(p, batch, rng), params, has_aux=True)
            (task_grads,) = jax.vmap(task_vjp)(jnp.eye(len(tasks), dtype=terms.dtype))  # leaves [K, ...]
            return terms, per_task, task_grads
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, scale)
        return loss, per_task, grads

    def _clipped(loss_fn, params, batch, rng, scale):
        from jax_privacy import clipped_grad

        if axis_name is not None or accum_steps != 1 or weighting.kind != "fixed":
            raise ValueError("DP-SGD's per-example clipping runs jitted over a mesh, with accum_steps=1 and "
                             "task weighting 'fixed'")
        grad = clipped_grad(lambda p, row, key: loss_fn(p, row, key, scale), has_aux=True, l2_clip_norm=dp_clip,
                            batch_argnums=1, prng_argnum=2, return_values=True, microbatch_size=dp_microbatch or None)
        grads, aux = grad(params, batch, rng)
        rows = batch["example_mask"].astype(jnp.float32)
        mean = lambda v: jnp.sum(jnp.reshape(v, rows.shape) * rows) / jnp.maximum(jnp.sum(rows), 1.0)
        return mean(aux.values), {k: mean(v) for k, v in aux.aux.items()}, grads

    def train_step(state: TrainState, batch):
        key, rng = step_keys(state, axis_name)
        extra, scale = {}, None
        if weighting.kind == "dwa":
            if "dwa_window_means" not in state.loss_state:
                raise ValueError("task_weighting='dwa' needs the state's loss_state from "
                                 "losses.init_loss_state (create_state(..., loss_state=...))")
            ready = state.step >= 2 * weighting.dwa_window
            scale = losses.dwa_weights(state.loss_state["dwa_window_means"], ready, weighting.dwa_temperature)
            extra.update({f"task_weight_{t.name}": scale[i] for i, t in enumerate(tasks)})
        if accum_steps == 1:
            out = contributions(state.params, batch, rng, scale, reduce, num_shards)
        else:  # a log-variance term per shard and microbatch: each adds its share
            out = _accumulate(lambda p, b, r, count: contributions(p, b, r, scale, count, num_shards * accum_steps),
                              state.params, batch, rng, accum_steps, reduce)
        first, per_task, grads = reduce(out)
        if weighting.kind == "pcgrad":
            # The projection order comes from the step's key, folded apart from dropout's use of it.
            grads, extra["pcgrad_conflicts"] = losses.pcgrad(grads, jax.random.fold_in(key, 0x5C),
                                                              losses.shared_parameters(state.params))
            loss = jnp.sum(first)
        else:
            loss = first
        loss_state = state.loss_state
        if weighting.kind == "dwa":  # the per-task losses are global here (after psum), as the weights need
            loss_state = losses.dwa_update(loss_state, jnp.stack([per_task[t.name] for t in tasks]), state.step,
                                           weighting.dwa_window)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": tree_norm(grads), "param_norm": tree_norm(params),
                   "update_norm": tree_norm(updates), **{f"loss_{k}": v for k, v in per_task.items()}, **extra}
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

