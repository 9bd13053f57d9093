"""What the fusion files share: their base settings, masked pooling per modality, the summary of
modalities with a learned placeholder for an absent one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import Dense, Dtype, masked_mean


class FusionBase(nn.Module):
    width: int = 128
    num_heads: int = 4
    depth: int = 2
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32


def pool(tokens, masks):
    """Per modality masked mean: (pooled [B, M, D], present bool [B, M]) in dict order."""
    pooled = jnp.stack([masked_mean(tokens[m], masks[m]) for m in tokens], axis=1)
    present = jnp.stack([jnp.any(masks[m], axis=-1) for m in tokens], axis=1)
    return pooled, present


def mean_over_present(x, present):
    """x [B, M, ...] averaged over the present modalities [B, M] (zero where none is present)."""
    w = present.astype(x.dtype).reshape(present.shape + (1,) * (x.ndim - 2))
    return jnp.sum(jnp.where(w > 0, x, 0), axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def softmax_over_present(logits, present):
    """Softmax over the modality axis (1) of logits [B, M, ...] restricted to `present` [B, M]: an
    absent modality's weight is exactly 0 (all zero when none is present)."""
    present = present.reshape(present.shape + (1,) * (logits.ndim - 2))
    present = jnp.broadcast_to(present, logits.shape)
    logits = jnp.where(present, logits.astype(jnp.float32), 0.0)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(present, logits, -1e30), axis=1, keepdims=True))
    top = jnp.where(jnp.any(present, axis=1, keepdims=True), top, 0.0)
    e = jnp.where(present, jnp.exp(jnp.minimum(logits - top, 0.0)), 0.0)  # no overflow, no inf anywhere
    return e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)


def with_placeholder(module: nn.Module, x, present, name: str = "missing_embedding"):
    """x [B, M, D] with each absent modality's row replaced by a learned placeholder [M, D]."""
    placeholder = module.param(name, nn.initializers.normal(0.02), x.shape[1:], jnp.float32)
    return jnp.where(present[..., None], x, placeholder.astype(x.dtype))


def summarize(module: nn.Module, pooled, present, dtype):
    """The per-modality summaries (placeholder for an absent one) side by side, mixed by a Dense +
    GELU: fused [B, 1, D], fused_mask [B, 1]. Keeps each modality apart (a mean blurs which one
    said what); an absent modality's content never enters."""
    x = with_placeholder(module, pooled, present)
    fused = nn.gelu(Dense(module.width, dtype=dtype, name="mix")(x.reshape(x.shape[0], -1)))
    return fused[:, None], jnp.any(present, axis=1, keepdims=True)


def embeddings(names, pooled) -> dict:
    return dict(zip(names, jnp.unstack(pooled, axis=1)))


def modality_segments(tokens):
    """(segment id per concatenated token [T] (static numpy), bounds (0, T_1, T_1 + T_2, ..., T))."""
    sizes = [tokens[m].shape[1] for m in tokens]
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return seg, tuple(int(b) for b in np.cumsum([0] + sizes))


def stack_padded(tokens, masks):
    """Every modality padded to the longest (padding masked): (x [M, B, T, D], valid bool [M, B, T]),
    for fusions that apply per-modality weights as one batch over the modality axis (nn.vmap)."""
    t = max(v.shape[1] for v in tokens.values())
    x = jnp.stack([jnp.pad(tokens[m], ((0, 0), (0, t - tokens[m].shape[1]), (0, 0))) for m in tokens])
    valid = jnp.stack([jnp.pad(masks[m], ((0, 0), (0, t - masks[m].shape[1]))) for m in tokens])
    return x, valid


def concat_with_modality_embedding(module: nn.Module, tokens, masks, dtype):
    """All modalities' tokens concatenated [B, T, D] plus a learned embedding of each token's
    modality, their mask [B, T], and the segment ids and bounds of `modality_segments`."""
    seg, bounds = modality_segments(tokens)
    emb = module.param("modality_embedding", nn.initializers.normal(0.02), (len(tokens), module.width), jnp.float32)
    x = jnp.concatenate(list(tokens.values()), axis=1) + emb[seg].astype(dtype)
    return x, jnp.concatenate(list(masks.values()), axis=1), seg, bounds
