"""A 1-D ResNet signal encoder (`resnet1d`): the xresnet1d of the PTB-XL benchmark, its last time steps as tokens."""

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
    "small": ((1, 1, 1), (32, 64, 128)),
}


def conv(features, kernel_size, stride, dtype, name):
    """XLA's convolution (`nn.Conv`, 'SAME'): ~10% faster here than `layers.Conv1D`, forward plus
    backward with stages="18" on XLA:CPU (benchmarks/encoders_cpu.py); no bias, a norm follows."""
    return nn.Conv(features, (kernel_size,), (stride,), padding="SAME", use_bias=False, dtype=dtype, name=name)


def halve_mask(mask):
    """[B, T] -> [B, T / 2]: a step is real where either of the two it covers is."""
    return einops.reduce(mask, "b (t two) -> b t", "max", two=2)


class ResBlock1D(nn.Module):
    """Two convolutions with a shortcut; stride 2 halves the time axis (the shortcut then averages
    pairs of steps before its 1x1 convolution, ResNet-D as in fastai's xresnet)."""

    features: int
    stride: int
    kernel_size: int
    num_groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):  # x [B, T, C], zero where mask [B, T / stride] (the output's) is False
        m = mask[..., None]
        h = conv(self.features, self.kernel_size, self.stride, self.dtype, "conv1")(x)
        h = jnp.where(m, nn.relu(GroupNorm(self.num_groups, name="norm1")(h, mask)), 0)
        h = conv(self.features, self.kernel_size, 1, self.dtype, "conv2")(h)
        h = GroupNorm(self.num_groups, scale_init=nn.initializers.zeros, name="norm2")(h, mask)
        if self.stride == 2:
            x = einops.reduce(x, "b (t two) c -> b t c", "mean", two=2)
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, 1, self.dtype, "shortcut")(x)
            x = GroupNorm(self.num_groups, name="shortcut_norm")(x, mask)
        return jnp.where(m, nn.relu(x + h), 0)


@ENCODERS.register("resnet1d")
class ResNet1DEncoder(EncoderBase):
    """The xresnet1d of the PTB-XL benchmark (Strodthoff et al., 2021, "Deep learning for ECG
    analysis: benchmarks and insights from PTB-XL"; the fastai xresnet of He et al., 2019, "Bag
    of tricks", in 1-D) with GroupNorm in place of BatchNorm, on a waveform [B, T, C] or on
    spectrogram frames [B, frames, bins].

    Stem: three convolutions (the first of stride 2) and a stride-2 max pool; then `stages` of
    residual blocks ("18": 2, 2, 2, 2 blocks of 64, 128, 256, 512 channels; "34": 3, 4, 6, 3;
    "small": 1, 1, 1 of 32, 64, 128; scaled by `base_channels / 64`), each stage after the first
    halving the time axis; every convolution has `kernel_size` taps (5 in the benchmark).
    Tokens: the last feature map's time steps (one per 32 input steps with "18", 0.32 s at
    100 Hz), projected to `width` and layer-normalized. The time mask (& presence) is applied
    first: masked steps are zeroed, kept out of every GroupNorm's statistics and re-zeroed after
    each block, so a valid token is the same whatever the padding holds or how long it is. The
    token mask is the time mask max-pooled to the tokens' resolution (a token is real when any
    step it covers is), & present. The input is zero-padded to a multiple of the total stride.
    `depth` and `num_heads` (the Transformer's) are unused.
    """

    kind = "signal"

    stages: str = "18"
    base_channels: int = 64
    kernel_size: int = 5
    norm_groups: int = 32

    def token_stride(self):
        return 4 * 2 ** (len(STAGES[self.stages][0]) - 1) if self.stages in STAGES else None

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, time_mask = inputs["values"], inputs["mask"] & inputs["present"][:, None]  # [B, T, C], [B, T]
        if self.stages not in STAGES:
            raise ValueError(f"resnet1d stages={self.stages!r}; use one of {sorted(STAGES)}")
        blocks, channels = STAGES[self.stages]
        channels = [max(c * self.base_channels // 64, 1) for c in channels]
        stride = self.token_stride()
        pad = ((0, 0), (0, -x.shape[1] % stride))
        mask = jnp.pad(time_mask, pad)
        x = jnp.where(mask[..., None], jnp.pad(x, pad + ((0, 0),)), 0).astype(self.dtype)

        k, g = self.kernel_size, self.norm_groups
        stem = (channels[0] // 2, channels[0] // 2, channels[0])
        for i, c in enumerate(stem):
            if i == 0:
                mask = halve_mask(mask)
            x = conv(c, k, 2 if i == 0 else 1, self.dtype, f"stem{i}")(x)
            x = jnp.where(mask[..., None], nn.relu(GroupNorm(g, name=f"stem{i}_norm")(x, mask)), 0)
        mask = halve_mask(mask)
        x = jnp.where(mask[..., None], nn.max_pool(x, (3,), (2,), padding="SAME"), 0)
        for i, (n, c) in enumerate(zip(blocks, channels)):
            for j in range(n):
                s = 2 if i > 0 and j == 0 else 1
                if s == 2:
                    mask = halve_mask(mask)
                x = ResBlock1D(c, s, k, g, self.dtype, name=f"stage{i}_block{j}")(x, mask)
        x = LayerNorm(name="norm")(Dense(self.width, dtype=self.dtype, name="token_projection")(x))
        return jnp.where(mask[..., None], x, 0).astype(self.dtype), mask
