"""`sum`: the sum of the present modalities' mean-pooled embeddings, each first passed through its
own Dense (the additive fusion of e.g. Baltrusaitis et al., 2019's survey; TorchMultimodal's
`sum` fuser). An absent modality's term is replaced by exact zero, so a patient's representation
is the sum over what it has, and its scale grows with the number of modalities present (unlike
`mean`)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool
from mmjax.models.layers import Dense


@FUSIONS.register("sum")
class SumFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        terms = [Dense(self.width, dtype=self.dtype, name=f"project_{m}")(pooled[:, i]) for i, m in enumerate(tokens)]
        x = sum(jnp.where(present[:, i, None], t, 0) for i, t in enumerate(terms))
        return nn.gelu(x)[:, None], jnp.any(present, axis=1, keepdims=True), {"embeddings": embeddings(tokens, pooled)}
