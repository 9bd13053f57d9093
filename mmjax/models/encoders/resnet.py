"""A convolutional image encoder (`resnet`): ResNet with GroupNorm, its final feature map as tokens."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase
from mmjax.models.layers import Dense, GroupNorm, LayerNorm

# stages -> (residual blocks per stage, channels per stage at base_channels=64)
STAGES = {
    "18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "small": ((1, 1, 1), (32, 64, 128)),  # 28x28 to 64x64 images
}


def _conv(features, kernel, stride, dtype, name):
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False, dtype=dtype,
                   name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (a 1x1 strided convolution where the shape changes)."""

    features: int
    stride: int
    num_groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        h = nn.relu(GroupNorm(self.num_groups, name="norm1")(h))
        h = _conv(self.features, 3, 1, self.dtype, "conv2")(h)
        h = GroupNorm(self.num_groups, scale_init=nn.initializers.zeros, name="norm2")(h)  # block starts as identity
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, self.dtype, "shortcut")(x)
            x = GroupNorm(self.num_groups, name="shortcut_norm")(x)
        return nn.relu(x + h)


@ENCODERS.register("resnet")
class ResNetEncoder(EncoderBase):
    """ResNet (He et al., 2016, basic blocks) with GroupNorm (Wu & He, 2018) in place of BatchNorm,
    so the model keeps no running statistics and a patient's tokens never depend on its batch.

    `stages`: "18" (2, 2, 2, 2 blocks of 64, 128, 256, 512 channels), "34" (3, 4, 6, 3) or "small"
    (1, 1, 1 blocks of 32, 64, 128), channels scaled by `base_channels / 64`; every stage after the
    first halves the resolution. `stem`: "small" is one 3x3 convolution of stride 1 (CIFAR-style,
    for images up to 64 px), "large" the 7x7 stride-2 convolution and 3x3 stride-2 max pool of
    ImageNet ResNets; "auto" picks "small" when the image's shorter side is at most 64 px.
    Tokens: each position of the final feature map (8x8 for a 32x32 image with "small", 7x7 for
    a 224x224 one with "18"), projected to `width`, plus a learned position embedding (so the
    image size is fixed once initialized), layer-normalized. The token mask is the presence flag
    broadcast over the positions (every position of a present image is real); an absent image's
    tokens are zero. `depth` and `num_heads` (the Transformer's) are unused.
    """

    kind = "image"

    stages: str = "18"
    base_channels: int = 64
    stem: str = "auto"
    norm_groups: int = 32

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x = inputs["values"].astype(self.dtype)  # [B, H, W, C]
        if self.stages not in STAGES:
            raise ValueError(f"resnet stages={self.stages!r}; use one of {sorted(STAGES)}")
        if self.stem not in ("auto", "small", "large"):
            raise ValueError(f"resnet stem={self.stem!r}; use 'auto', 'small' or 'large'")
        blocks, channels = STAGES[self.stages]
        channels = [max(c * self.base_channels // 64, 1) for c in channels]
        small = self.stem == "small" or (self.stem == "auto" and min(x.shape[1:3]) <= 64)
        if small:
            x = _conv(channels[0], 3, 1, self.dtype, "stem")(x)
            x = nn.relu(GroupNorm(self.norm_groups, name="stem_norm")(x))
        else:
            x = _conv(channels[0], 7, 2, self.dtype, "stem")(x)
            x = nn.relu(GroupNorm(self.norm_groups, name="stem_norm")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for i, (n, c) in enumerate(zip(blocks, channels)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(c, stride, self.norm_groups, self.dtype, name=f"stage{i}_block{j}")(x)
        x = einops.rearrange(x, "b h w c -> b (h w) c")
        x = Dense(self.width, dtype=self.dtype, name="token_projection")(x)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:], jnp.float32)
        x = LayerNorm(name="norm")(x + pos.astype(x.dtype)).astype(self.dtype)
        mask = jnp.broadcast_to(inputs["present"][:, None], x.shape[:2])
        return jnp.where(mask[..., None], x, 0).astype(self.dtype), mask
