"""`concat`: the early-fusion baseline. Each modality's tokens are mean-pooled, the pooled vectors
are concatenated (a learned placeholder in the slot of an absent modality, so its content never
enters) and mixed by a Dense + GELU."""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool, summarize


@FUSIONS.register("concat")
class ConcatFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        fused, fused_mask = summarize(self, pooled, present, self.dtype)
        return fused, fused_mask, {"embeddings": embeddings(tokens, pooled)}
