"""`cross_attention`: stacked layers in which each modality's tokens attend to the tokens of all
other present modalities, then to their own, then an MLP (the co-attention of ViLBERT, Lu et al.,
2019, generalized to M modalities); masked pooling per modality; the modalities' summaries (a
learned placeholder for an absent one) concatenated and mixed.

All tokens are concatenated once ([B, T, D], T = sum of T_m) with a modality embedding; a block
mask selects the cross-modality pairs, so cross-attention is one batched attention per layer
instead of M * (M - 1) small ones.

Two choices make it at least as good as `concat` on `synthetic_patients` (docs/results.md, "Cross-attention
versus concat"): `skip` puts each modality's pooled encoder output (what `concat` mixes) beside its
attended summary, so attention can only add to it, and `cross_gate` scales each layer's
cross-attention branch by a learned scalar that starts at 0 (ReZero, Bachlechner et al., 2020), so
training starts from the unimodal encoders and opens the cross-modal path as far as it helps.
`skip=False, cross_gate=False` is the earlier form.

An absent modality's tokens are masked keys (softmax weight
exactly 0) and its summary slot holds the placeholder, so its content never enters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, concat_with_modality_embedding, embeddings, pool, summarize
from mmjax.models.layers import MLP, Dtype, LayerNorm, MultiHeadAttention


class CrossAttentionLayer(nn.Module):
    """Pre-norm: cross-attention to the other modalities, self-attention within each modality, MLP.

    x: [B, T, D] all modalities' tokens concatenated; `pair_mask` [B, T, T] True where both tokens
    are valid, `cross_mask` that and of different modalities; `bounds` the static start/end of each
    modality. Self-attention (one projection, weights shared by the modalities) attends within
    each modality's block, so it costs sum(T_m^2), not T^2.
    """

    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: Dtype
    cross_gate: bool = False

    @nn.compact
    def __call__(self, x, pair_mask, cross_mask, bounds, train):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = LayerNorm(name="ln_cross")(x).astype(self.dtype)
        h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="cross_attn")(h, cross_mask)
        if self.cross_gate:  # ReZero-style: the cross-modal branch starts closed and opens as it helps
            h = h * self.param("gate", nn.initializers.zeros, (), jnp.float32).astype(h.dtype)
        x = x + drop(h)
        h = LayerNorm(name="ln_self")(x).astype(self.dtype)
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="self_attn")(h, pair_mask, segments=bounds)
        x = x + drop(h)
        h = LayerNorm(name="ln_mlp")(x).astype(self.dtype)
        h = MLP(self.mlp_ratio * x.shape[-1], dtype=self.dtype, name="mlp")(h)
        return x + drop(h), weights


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(FusionBase):
    skip: bool = True  # the encoders' own pooled summaries join the attended ones in the mix
    cross_gate: bool = True  # a learned scalar gate per layer on the cross-attention branch, starting at 0

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        names = list(tokens)
        x, valid, seg, bounds = concat_with_modality_embedding(self, tokens, masks, self.dtype)  # [B, T, D], [B, T]
        pair_mask = valid[:, :, None] & valid[:, None, :]  # [B, T, T]: both tokens valid
        before, _ = pool(tokens, masks)
        cross_mask = pair_mask & jnp.asarray(seg[:, None] != seg[None, :])
        attention = []
        for i in range(self.depth):
            x, w = CrossAttentionLayer(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, self.cross_gate,
                                       name=f"layer{i}")(x, pair_mask, cross_mask, bounds, train)
            attention.append(w)
        x = LayerNorm(name="norm")(x).astype(self.dtype)
        pooled, present = pool({m: x[:, bounds[i]:bounds[i + 1]] for i, m in enumerate(names)}, masks)
        fused, fused_mask = summarize(self, jnp.concatenate([before, pooled], -1) if self.skip else pooled, present,
                                      self.dtype)
        aux = {"embeddings": embeddings(names, pooled), "attention": attention,
               "token_modality": jnp.asarray(seg, jnp.int32)}
        return fused, fused_mask, aux
