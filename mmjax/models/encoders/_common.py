"""The base every encoder shares: settings and the Transformer trunk of the default encoders."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import Dtype, LayerNorm, TransformerBlock


class Trunk(nn.Module):
    """Position embedding, `depth` Transformer blocks, final norm."""

    depth: int
    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, mask, train):
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:], jnp.float32)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"block{i}")(
                x, mask, train)
        x = LayerNorm(name="norm")(x).astype(self.dtype)
        return jnp.where(mask[..., None], x, 0).astype(self.dtype)


class EncoderBase(nn.Module):
    kind: ClassVar[str] = ""  # the modality kind it encodes (image, text, tabular, signal)

    width: int = 128
    depth: int = 1
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def trunk(self, x, mask, train):
        return Trunk(self.depth, self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name="trunk")(
            x, mask, train)


