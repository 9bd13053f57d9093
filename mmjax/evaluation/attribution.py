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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
