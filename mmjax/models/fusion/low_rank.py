"""`low_rank`: low-rank multimodal fusion (Liu et al., 2018, "Efficient low-rank multimodal fusion
with modality-specific factors"). The tensor-fusion weight is factored into `rank` terms of
per-modality factors: h = sum_r prod_m (W_m^(r) [z_m; 1]), so the cost is linear in the number of
modalities instead of exponential, and the outer product is never formed.

An absent modality's z_m is exactly 0, so its factor is W_m^(r)'s last column alone (the same
[0; 1] treatment as tensor fusion): its content never enters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool
from mmjax.models.layers import Dense


@FUSIONS.register("low_rank")
class LowRankFusion(FusionBase):
    rank: int = 4

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        b = pooled.shape[0]
        product = None
        for i, m in enumerate(tokens):
            z = jnp.concatenate([jnp.where(present[:, i, None], pooled[:, i], 0), jnp.ones((b, 1), pooled.dtype)], -1)
            factor = Dense(self.rank * self.width, use_bias=False, dtype=self.dtype, name=f"factor_{m}")(z)
            factor = factor.reshape(b, self.rank, self.width)
            product = factor if product is None else product * factor
        rank_weight = self.param("rank_weight", nn.initializers.normal(1.0 / self.rank), (self.rank,), jnp.float32)
        fused = jnp.einsum("brd,r->bd", product, rank_weight.astype(product.dtype))
        fused = fused + self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32).astype(fused.dtype)
        aux = {"embeddings": embeddings(tokens, pooled)}
        return nn.gelu(fused)[:, None], jnp.any(present, axis=1, keepdims=True), aux
