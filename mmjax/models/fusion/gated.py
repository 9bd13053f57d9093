"""`gated`: gated multimodal units (Arevalo et al., 2017, "Gated multimodal units for information
fusion"), generalized from two to M modalities.

Each modality's pooled embedding x_m gives a candidate h_m = tanh(W_m x_m); a gate network reads
all modalities side by side, z = W_z [x_1; ...; x_M] (gate logits [B, M, D], one per modality and
feature); the fused vector is sum_m g_m * h_m (elementwise) with g the softmax of z over the
present modalities, feature by feature. For two modalities this is Arevalo's z * h_1 + (1 - z) * h_2
with z = sigmoid(z_1 - z_2) per feature. An absent modality's slot in the gate input is a learned
placeholder and its gate is exactly 0, so its content never enters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool, softmax_over_present, with_placeholder
from mmjax.models.layers import Dense


@FUSIONS.register("gated")
class GatedFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        candidates = jnp.stack([jnp.tanh(Dense(self.width, dtype=self.dtype, name=f"candidate_{m}")(pooled[:, i]))
                                for i, m in enumerate(tokens)], axis=1)  # [B, M, D]
        gate_in = with_placeholder(self, pooled, present).reshape(pooled.shape[0], -1)
        logits = Dense(len(tokens) * self.width, dtype=self.dtype, name="gate")(gate_in)
        gates = softmax_over_present(logits.reshape(candidates.shape), present)  # [B, M, D]
        fused = jnp.sum(gates.astype(self.dtype) * jnp.where(present[..., None], candidates, 0), axis=1)
        aux = {"embeddings": embeddings(tokens, pooled), "gates": gates}
        return fused[:, None], jnp.any(present, axis=1, keepdims=True), aux
