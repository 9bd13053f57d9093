"""`mean`: the average of the present modalities' mean-pooled embeddings. An absent modality is
left out of the sum and of the count (weight exactly 0)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, mean_over_present, pool


@FUSIONS.register("mean")
class MeanFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        fused = mean_over_present(pooled, present)[:, None]
        return fused, jnp.any(present, axis=1, keepdims=True), {"embeddings": embeddings(tokens, pooled)}
