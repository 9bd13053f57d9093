"""`perceiver`: a Perceiver-style latent bottleneck (Jaegle et al., 2021, "Perceiver: general
perception with iterative attention"). A learned array of `num_latents` latent vectors
cross-attends to all modalities' tokens (concatenated, with a modality embedding), then `depth`
self-attention blocks process the latents; the fused vector is the latents' mean. Cross-attention
costs num_latents x T, linear in the number of input tokens, whatever the number of modalities.

An absent modality's tokens are masked keys with softmax weight exactly 0 (a patient with no
modality gets a zero cross-attention update), so its content never enters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, concat_with_modality_embedding, embeddings, pool
from mmjax.models.layers import MLP, LayerNorm, MultiHeadAttention, TransformerBlock


@FUSIONS.register("perceiver")
class PerceiverFusion(FusionBase):
    num_latents: int = 16

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        names = list(tokens)
        context, valid, seg, _ = concat_with_modality_embedding(self, tokens, masks, self.dtype)
        b = context.shape[0]
        latents = self.param("latents", nn.initializers.normal(0.02), (self.num_latents, self.width), jnp.float32)
        z = jnp.broadcast_to(latents.astype(self.dtype), (b,) + latents.shape)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        cross_mask = jnp.broadcast_to(valid[:, None, :], (b, self.num_latents, valid.shape[1]))
        h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="cross_attn")(
            LayerNorm(name="ln_latents")(z).astype(self.dtype), cross_mask,
            context=LayerNorm(name="ln_inputs")(context).astype(self.dtype))
        z = z + drop(h)
        z = z + drop(MLP(self.mlp_ratio * self.width, dtype=self.dtype, name="cross_mlp")(
            LayerNorm(name="ln_cross_mlp")(z).astype(self.dtype)))
        all_latents = jnp.ones((b, self.num_latents), bool)
        for i in range(self.depth):
            z = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"latent_block{i}")(
                z, all_latents, train)
        z = LayerNorm(name="norm")(z).astype(self.dtype)
        pooled, present = pool(tokens, masks)
        aux = {"embeddings": embeddings(names, pooled), "attention": [weights],
               "token_modality": jnp.asarray(seg, jnp.int32)}
        return jnp.mean(z, axis=1)[:, None], jnp.any(present, axis=1, keepdims=True), aux
