"""Decision (late) fusion: each modality's pooled embedding gets its own task heads (K = M).

`late` averages the heads' logits over the present modalities with equal weights; `weighted_late`
learns one decision weight per modality (softmax of learned logits) and renormalizes them over the
modalities present for each patient, so an absent modality's weight is exactly 0 and the present
ones sum to 1 (the weighted-vote late fusion of e.g. Ramachandram & Taylor, 2017; Huang et al.,
2020, "Fusion of medical imaging and EHR").
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool, softmax_over_present


@FUSIONS.register("late")
class LateFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        return pooled, present, {"embeddings": embeddings(tokens, pooled)}


@FUSIONS.register("weighted_late")
class WeightedLateFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        logits = self.param("decision_logits", nn.initializers.zeros, (len(tokens),), jnp.float32)
        weights = softmax_over_present(jnp.broadcast_to(logits, present.shape), present)  # [B, M]
        return pooled, present, {"embeddings": embeddings(tokens, pooled), "fused_weights": weights}
