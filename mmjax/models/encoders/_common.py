"""The base every encoder shares: settings and the Transformer trunk of the default encoders."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

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

    def token_stride(self):
        """What one output token covers of the input, where tokens form a regular grid over it: input
        steps (signals), (rows, cols) of pixels (images), 1 (text: a token per input token); None when
        they do not (the self-supervised masked modelling needs it: `mmjax/training/pretrain.py`)."""
        return 1 if self.kind == "text" else None

    def trunk(self, x, mask, train):
        return Trunk(self.depth, self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name="trunk")(
            x, mask, train)




def category_embeddings(module: nn.Module, categories, sizes, features: int):
    """Each categorical column's embedding [B, G, features] from one table of sum(sizes) rows (column
    g's rows start at sizes[0] + ... + sizes[g-1]; its index 0 is missing, 1 unseen, 2+k category k)."""
    if categories.shape[1] != len(sizes):
        raise ValueError(f"{categories.shape[1]} categorical columns, the encoder was built for {len(sizes)}")
    offsets = jnp.asarray(np.cumsum((0,) + tuple(sizes[:-1])), jnp.int32)
    table = module.param("category_embedding", nn.initializers.normal(0.02), (sum(sizes), features), jnp.float32)
    return table[categories + offsets]
