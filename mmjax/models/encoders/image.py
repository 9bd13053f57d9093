"""The default image encoder (`image`): a ViT."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase
from mmjax.models.layers import Dense


@ENCODERS.register("image")
class ImageEncoder(EncoderBase):
    """ViT-style: non-overlapping `patch_size` patches, a linear embedding, a Transformer."""

    kind = "image"

    patch_size: int = 8

    def token_stride(self):
        return (self.patch_size, self.patch_size)

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x = inputs["values"]  # [B, H, W, C]
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image {x.shape[1:3]} is not divisible into {p}x{p} patches")
        patches = einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        tokens = Dense(self.width, dtype=self.dtype, name="patch_embedding")(patches)
        mask = jnp.broadcast_to(inputs["present"][:, None], tokens.shape[:2])
        return self.trunk(tokens, mask, train), mask
