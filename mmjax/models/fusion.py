"""Fusion methods behind one contract, chosen by name from `FUSIONS`.

    fused [B, K, D], fused_mask bool [B, K], aux = fusion(tokens, masks, train=...)

`tokens` maps each modality to its encoder's `[B, T_m, D]` tokens and `masks` to its `[B, T_m]`
token mask; a modality is absent for a patient when its mask row is all False. `K` is 1 for
methods that produce one representation; decision fusion (`late`) returns one per modality
(`K = M`) and the model averages the heads' logits over `fused_mask`. `aux['embeddings']` holds
the pooled per-modality embeddings `[B, D]`; `cross_attention` adds `aux['attention']`, one
`[B, heads, T, T]` weight array per layer over the concatenated tokens (`aux['token_modality']`
[T] gives each token's modality as an index into the order of `tokens`). Every method excludes
an absent modality exactly: its tokens only
enter through masked sums and masked softmax weights that are exactly zero.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import MLP, Dense, Dtype, LayerNorm, MultiHeadAttention, masked_mean
from mmjax.models.registry import Registry

FUSIONS = Registry("fusion")


def _pool(tokens, masks):
    """Per modality masked mean: (pooled [B, M, D], present [B, M]) in dict order."""
    pooled = jnp.stack([masked_mean(tokens[m], masks[m]) for m in tokens], axis=1)
    present = jnp.stack([jnp.any(masks[m], axis=-1) for m in tokens], axis=1)
    return pooled, present


def _mean_over_present(x, present):
    """x [B, M, D] averaged over the present modalities -> [B, D] (zero when none is present)."""
    w = present.astype(x.dtype)[..., None]
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class _FusionBase(nn.Module):
    width: int = 128
    num_heads: int = 4
    depth: int = 2
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32


@FUSIONS.register("concat")
class ConcatFusion(_FusionBase):
    """Early-fusion baseline: pooled embeddings (a learned placeholder for an absent modality)
    concatenated and mixed by an MLP."""

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = _pool(tokens, masks)
        placeholder = self.param("missing_embedding", nn.initializers.normal(0.02), pooled.shape[1:], jnp.float32)
        x = jnp.where(present[..., None], pooled, placeholder.astype(pooled.dtype))
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(Dense(self.width, dtype=self.dtype, name="mix")(x))
        fused_mask = jnp.any(present, axis=1, keepdims=True)
        return x[:, None], fused_mask, {"embeddings": dict(zip(tokens, jnp.unstack(pooled, axis=1)))}


@FUSIONS.register("mean")
class MeanFusion(_FusionBase):
    """The average of the present modalities' pooled embeddings."""

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = _pool(tokens, masks)
        x = _mean_over_present(pooled, present)
        fused_mask = jnp.any(present, axis=1, keepdims=True)
        return x[:, None], fused_mask, {"embeddings": dict(zip(tokens, jnp.unstack(pooled, axis=1)))}


@FUSIONS.register("late")
class LateFusion(_FusionBase):
    """Decision fusion: each modality's pooled embedding gets its own heads (K = M); the model
    averages their logits over the present modalities."""

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = _pool(tokens, masks)
        return pooled, present, {"embeddings": dict(zip(tokens, jnp.unstack(pooled, axis=1)))}


class CrossAttentionLayer(nn.Module):
    """Pre-norm: cross-attention to the other modalities, self-attention within each modality, MLP.

    x: [B, T, D] all modalities' tokens concatenated; `pair_mask` [B, T, T] True where both tokens
    are valid, `cross_mask` that and of different modalities; `bounds` the static start/end of each
    modality. Cross-attention is one masked attention over all tokens (a token may attend to the
    valid tokens of the other modalities); self-attention (one projection, weights shared by the
    modalities) attends within each modality's block, so it costs sum(T_m^2), not T^2.
    """

    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, pair_mask, cross_mask, bounds, train):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = LayerNorm(name="ln_cross")(x).astype(self.dtype)
        h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="cross_attn")(h, cross_mask)
        x = x + drop(h)
        h = LayerNorm(name="ln_self")(x).astype(self.dtype)
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="self_attn")(h, pair_mask, segments=bounds)
        x = x + drop(h)
        h = LayerNorm(name="ln_mlp")(x).astype(self.dtype)
        h = MLP(self.mlp_ratio * x.shape[-1], dtype=self.dtype, name="mlp")(h)
        return x + drop(h), weights


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(_FusionBase):
    """Stacked layers in which each modality's tokens attend to the tokens of all other present
    modalities, then to their own, then an MLP; masked pooling per modality; the modalities'
    summaries (a learned placeholder for an absent one) concatenated and mixed.

    All tokens are concatenated once ([B, T, D], T = sum of T_m) with a modality embedding; a
    block mask selects the cross-modality pairs, so cross-attention is one batched attention per
    layer instead of M * (M - 1) small ones.
    """

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        names = list(tokens)
        seg = np.concatenate([np.full(tokens[m].shape[1], i) for i, m in enumerate(names)])  # static
        type_emb = self.param("modality_embedding", nn.initializers.normal(0.02),
                              (len(names), self.width), jnp.float32)
        x = jnp.concatenate([tokens[m] for m in names], axis=1)
        x = x + type_emb[seg].astype(x.dtype)
        valid = jnp.concatenate([masks[m] for m in names], axis=1)  # [B, T]
        other = jnp.asarray(seg[:, None] != seg[None, :])
        pair_mask = valid[:, :, None] & valid[:, None, :]  # [B, T, T]: both tokens valid
        cross_mask = pair_mask & other
        bounds = tuple(int(b) for b in np.cumsum([0] + [tokens[m].shape[1] for m in names]))
        attention = []
        for i in range(self.depth):
            x, w = CrossAttentionLayer(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"layer{i}")(
                x, pair_mask, cross_mask, bounds, train)
            attention.append(w)
        x = LayerNorm(name="norm")(x).astype(self.dtype)
        per_mod = {m: x[:, bounds[i]:bounds[i + 1]] for i, m in enumerate(names)}
        pooled, present = _pool(per_mod, masks)
        # Keep each modality's summary apart (a mean over modalities blurs which one said what);
        # an absent modality is a learned placeholder, so its content never enters.
        placeholder = self.param("missing_embedding", nn.initializers.normal(0.02), pooled.shape[1:], jnp.float32)
        summary = jnp.where(present[..., None], pooled, placeholder.astype(pooled.dtype))
        fused = nn.gelu(Dense(self.width, dtype=self.dtype, name="mix")(summary.reshape(summary.shape[0], -1)))
        aux = {"embeddings": dict(zip(names, jnp.unstack(pooled, axis=1))), "attention": attention,
               "token_modality": jnp.asarray(seg, jnp.int32)}
        return fused[:, None], jnp.any(present, axis=1, keepdims=True), aux
