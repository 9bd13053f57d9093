"""`tensor`: tensor fusion (Zadeh et al., 2017, "Tensor Fusion Network for multimodal sentiment
analysis"). Each modality's pooled embedding is projected to `tensor_dim` features z_m and extended
with a constant 1; the outer product of the M vectors [z_m; 1] (size prod (tensor_dim + 1)) holds
every unimodal, bimodal, ..., M-modal product of features, and a Dense maps it to the width.

An absent modality's z_m is exactly 0, so its factor is [0, ..., 0, 1]: the product keeps only
the interactions of the present modalities (its content never enters).

Size guard: the outer product has (tensor_dim + 1)^M entries and the Dense after it that many
times `width` weights. `tensor_dim=0` (default) takes the largest dimension <= 16 that keeps it
within `max_features` (32,768: 4 modalities at 12, 6 at 4); an explicit `tensor_dim` over the
limit raises (use `low_rank`, which costs M * rank * (tensor_dim + 1) * width, for more).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool
from mmjax.models.layers import Dense


def tensor_size(dim: int, num_modalities: int) -> int:
    return (dim + 1) ** num_modalities


@FUSIONS.register("tensor")
class TensorFusion(FusionBase):
    tensor_dim: int = 0  # features per modality before the outer product; 0: the largest that fits
    max_features: int = 32768

    def dim(self, num_modalities: int) -> int:
        if self.tensor_dim:
            if tensor_size(self.tensor_dim, num_modalities) > self.max_features:
                raise ValueError(
                    f"tensor fusion of {num_modalities} modalities at tensor_dim={self.tensor_dim} has "
                    f"{tensor_size(self.tensor_dim, num_modalities):,} features "
                    f"(> max_features={self.max_features:,}); "
                    f"lower tensor_dim, raise max_features, or use the low_rank fusion")
            return self.tensor_dim
        dim = 16
        while dim > 1 and tensor_size(dim, num_modalities) > self.max_features:
            dim -= 1
        if tensor_size(dim, num_modalities) > self.max_features:
            raise ValueError(f"tensor fusion of {num_modalities} modalities has {tensor_size(1, num_modalities):,} "
                             f"features even at tensor_dim=1 (> max_features={self.max_features:,}); "
                             f"use the low_rank fusion")
        return dim

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        pooled, present = pool(tokens, masks)
        b, dim = pooled.shape[0], self.dim(len(tokens))
        one = jnp.ones((b, 1), self.dtype)
        product = one
        for i, m in enumerate(tokens):
            z = Dense(dim, dtype=self.dtype, name=f"project_{m}")(pooled[:, i])
            z = jnp.concatenate([jnp.where(present[:, i, None], z, 0), one], axis=-1)  # [B, dim + 1]
            product = jnp.einsum("bi,bj->bij", product, z).reshape(b, -1)
        fused = nn.gelu(Dense(self.width, dtype=self.dtype, name="mix")(product))
        return fused[:, None], jnp.any(present, axis=1, keepdims=True), {"embeddings": embeddings(tokens, pooled)}
