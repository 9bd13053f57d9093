"""Integrated gradients (Sundararajan, Taly & Yan, 2017) of one model output over every modality's
input at once.

The path goes from a baseline to the input, all modalities together: continuous inputs (image
pixels, tabular values, signal samples, in the model's standardized units) from 0 (the training
mean) to their values, and text through its token embeddings, from 0 to the embedded tokens (the
text encoder's `embedding` layer is intercepted, so its ids never need a gradient). Attribution
of input i: `(x_i - x'_i) * integral over the path of df/dx_i` (`steps` points, denser near the
baseline: `path_points`), so
the attributions of a patient sum to f(input) - f(baseline) up to the rule's error
(completeness, checked by `completeness_gap` and in the tests). Absent modalities stay absent
(the model ignores their content), so they get 0.

Returned per modality: an array of the input's shape without the feature axis of text ([B, L]:
per token, summed over the embedding), and with it for the others (image [B, H, W, C], tabular
[B, F], signal [B, T, C]); `heatmap` reduces them for display.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.experiment import EVAL_DIR
from mmjax.training.parallel import device_batch
from mmjax.training.step import predictions


def output_fn(model, tasks, task: str, index: int | None = None):
    """f(params, batch) -> [B]: the probability (classification; multiclass: of class `index`) or the
    value (regression) of one output; multilabel: label `index`."""

    def f(params, batch):
        outputs, _ = model.apply({"params": params}, batch, train=False)
        p = predictions(outputs, tasks)[task]
        return p if p.ndim == 1 else p[:, index]

    return f


def _text_embedding_interceptor(scales: dict, deltas: dict):
    """Scales each text modality's embedding output by its alpha and adds a perturbation whose gradient
    is the gradient with respect to the embedded tokens."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, nn.Embed) and module.name == "embedding" and context.method_name == "__call__":
            parent = module.scope.path[-2] if len(module.scope.path) >= 2 else ""
            m = parent[: -len("_encoder")] if parent.endswith("_encoder") else None
            if m in scales:
                return out * scales[m].astype(out.dtype) + deltas[m].astype(out.dtype)
        return out

    return interceptor


def integrated_gradients(model, params, batch: dict, f, kinds: dict, steps: int = 64) -> dict:
    """{modality: attributions} for `f(params, batch) -> [B]` (see `output_fn`); `kinds` maps each
    modality of the batch to its kind. Also returns '_f_input' and '_f_baseline' ([B]) for the
    completeness check."""
    names = [m for m in kinds if m in batch]
    continuous = [m for m in names if kinds[m] != "text"]
    text = [m for m in names if kinds[m] == "text"]
    x = {m: jnp.asarray(batch[m]["values"], jnp.float32) for m in continuous}
    b = len(np.asarray(batch["example_mask"]))
    width = jax.tree_util.tree_leaves(params[f"{text[0]}_encoder"]["embedding"])[0].shape[-1] if text else 0
    zeros = {m: jnp.zeros((b, np.asarray(batch[m]["values"]).shape[1], width), jnp.float32) for m in text}

    def value(inputs, deltas, alpha):
        view = dict(batch)
        for m in continuous:
            view[m] = {**batch[m], "values": inputs[m]}
        with nn.intercept_methods(_text_embedding_interceptor({m: alpha for m in text}, deltas)):
            return f(params, view)

    def grads(alpha):
        inputs = {m: alpha * x[m] for m in continuous}
        return jax.grad(lambda i, d: jnp.sum(value(i, d, alpha)), argnums=(0, 1))(inputs, zeros)

    alphas, weights = path_points(steps)
    g_cont, g_text = jax.lax.map(grads, alphas)  # leaves [steps, ...]
    mean = lambda g: jnp.tensordot(weights, g, axes=1)  # the path integral of the gradient
    out = {m: np.asarray(x[m] * mean(g_cont[m])) for m in continuous}
    if text:
        emb = _embeddings(params, batch, text)
        out.update({m: np.asarray(jnp.sum(emb[m] * mean(g_text[m]), -1)) for m in text})
    out["_f_input"] = np.asarray(f(params, batch))
    out["_f_baseline"] = np.asarray(value({m: 0 * x[m] for m in continuous}, zeros, jnp.float32(0.0)))
    return out


def path_points(steps: int) -> tuple[jax.Array, jax.Array]:
    """Points alpha_k in (0, 1) and weights (summing to 1) for the integral over the path: the midpoint
    rule in u with alpha = u^3, which puts most points near the baseline, where a model whose first
    layer is followed by a normalization changes fastest (LayerNorm makes it almost scale-invariant,
    so f(alpha x) moves mostly at small alpha); the uniform midpoint rule misses that."""
    u = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    return u**3, 3 * u**2 / steps


def _embeddings(params, batch, text) -> dict:
    """Each text modality's embedded tokens [B, L, D] (the embedding layer's output)."""
    return {m: jnp.take(params[f"{m}_encoder"]["embedding"]["embedding"], jnp.asarray(batch[m]["values"]), axis=0)
            for m in text}


def completeness_gap(attributions: dict) -> np.ndarray:
    """[B]: sum of all attributions minus (f(input) - f(baseline))."""
    total = sum(np.asarray(v).reshape(len(v), -1).sum(1) for k, v in attributions.items() if not k.startswith("_"))
    return total - (attributions["_f_input"] - attributions["_f_baseline"])


def heatmap(attribution: np.ndarray, kind: str) -> np.ndarray:
    """For display: image [B, H, W] (summed over channels), signal [B, T] (summed |.| over channels),
    tabular [B, F] and text [B, L] as they are."""
    a = np.asarray(attribution)
    if kind == "image":
        return a.sum(-1)
    if kind == "signal":
        return np.abs(a).sum(-1)
    return a


def explain(predictor, split: str = "test", count: int = 4, output: str = "", steps: int = 64,
            patients=()) -> dict:
    """Integrated gradients of one output (`task` or `task.label`; default: the first classification
    task's first label) for the first `count` patients of `split`, or for the rows of the patient ids
    `patients`, every modality's input at once (above), and the fusion's
    attention maps when it has them; written to `eval/<split>_attributions.npz`."""
    task, index, name = output_of(predictor.tasks, output)
    batch = pick_rows(predictor.batches(split), count, patients, split)
    kinds = {m.name: m.kind for m in predictor.spec.select_modalities(predictor.modalities)}
    device = device_batch(batch)
    f = output_fn(predictor.model, predictor.tasks, task, index)
    a = integrated_gradients(predictor.model, predictor.params, device, f, kinds, steps)
    out = {"patient_id": np.asarray(batch["patient_id"]).astype(str), "output": np.array(name), "step": predictor.step,
           "f_input": a["_f_input"], "f_baseline": a["_f_baseline"], "completeness_gap":
           completeness_gap(a), "modalities": np.array(list(kinds)),
           "kinds": np.array([kinds[m] for m in kinds])}
    for m, kind in kinds.items():
        out[f"attribution/{m}"] = heatmap(a[m], kind)
        out[f"present/{m}"] = np.asarray(batch[m]["present"])
        if kind == "text":
            vocab = np.array(predictor.spec.modality(m).vocab)
            out[f"tokens/{m}"] = np.where(np.asarray(batch[m]["mask"]), vocab[np.asarray(batch[m]["values"])], "")
        else:
            out[f"input/{m}"] = np.asarray(batch[m]["values"])
    _, aux = predictor.model.apply({"params": predictor.params}, device, train=False)
    if "attention" in aux:  # [layers] of [B, heads, T, T] -> [B, layers, T, T], mean over heads
        out["attention"] = np.stack([np.asarray(w).mean(1) for w in aux["attention"]], 1)
        out["token_modality"] = np.asarray(aux["token_modality"])
    np.savez_compressed(os.path.join(predictor.workdir, EVAL_DIR, f"{split}_attributions.npz"), **out)
    return out


def output_of(tasks, output: str) -> tuple[str, int | None, str]:
    """(task, index, name) of 'task' or 'task.label' (default: the first classification output)."""
    by_name = {t.name: t for t in tasks}
    if not output:
        t = next((t for t in tasks if t.kind != "regression"), tasks[0])
        output = t.name if t.kind in ("binary", "regression") else f"{t.name}.{t.label_names[0]}"
    task, _, label = output.partition(".")
    if task not in by_name:
        raise ValueError(f"explain output {output!r}: no task {task!r}; tasks are {sorted(by_name)}")
    t = by_name[task]
    if t.kind in ("binary", "regression"):
        return task, None, task
    if label not in t.label_names:
        raise ValueError(f"explain output {output!r}: task {task!r} has labels {list(t.label_names)}")
    return task, list(t.label_names).index(label), output


def pick_rows(batches, count: int, patients=(), split: str = "") -> dict:
    """One batch of the first `count` real rows of `batches`, or of every row of the patient ids
    `patients` (an error naming the ids not found)."""
    wanted = {str(p) for p in patients}
    picked, found, total = [], set(), 0
    for batch in batches:
        real = np.flatnonzero(np.asarray(batch["example_mask"], bool))
        ids = np.asarray(batch["patient_id"]).astype(str)
        rows = [r for r in real if ids[r] in wanted] if wanted else real[:count - total]
        found.update(ids[rows])
        if len(rows):
            picked.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[rows], batch))
            total += len(rows)
        if (found == wanted) if wanted else total >= count:
            break
    if wanted and found != wanted:
        raise ValueError(f"split {split!r} has no patient(s) {sorted(wanted - found)}")
    if not picked:
        raise ValueError(f"split {split!r} has no rows to explain")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *picked)
