"""An InceptionTime signal encoder (`inception1d`): parallel long kernels, pooled into one token per patch."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase
from mmjax.models.layers import Conv1D, Dense, GroupNorm, LayerNorm


def long_conv(features, kernel_size, dtype, name):
    """The long kernels: XLA's convolution (`nn.Conv`), 2x faster here, forward plus backward, than
    `Conv1D`'s im2col of 39 shifted copies (benchmarks/encoders_cpu.py); the 1x1 ones are `Conv1D`."""
    return nn.Conv(features, (kernel_size,), padding="SAME", dtype=dtype, name=name)


class InceptionModule(nn.Module):
    """A 1x1 bottleneck, then `kernel_sizes` convolutions side by side with a max-pool branch
    (3 steps, then 1x1), concatenated: `filters * (len(kernel_sizes) + 1)` channels."""

    filters: int
    bottleneck: int
    kernel_sizes: tuple[int, ...]
    num_groups: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):  # x [B, T, C], zero where mask [B, T] is False
        m = mask[..., None]
        h = x
        if x.shape[-1] > 1 and self.bottleneck:  # Fawaz et al. skip it on a single channel
            h = jnp.where(m, Conv1D(self.bottleneck, 1, dtype=self.dtype, name="bottleneck")(x), 0)
        branches = [long_conv(self.filters, k, self.dtype, f"conv{k}")(h) for k in self.kernel_sizes]
        pooled = nn.max_pool(jnp.where(m, x, -jnp.inf), (3,), padding="SAME")  # padding never wins the max
        branches.append(Conv1D(self.filters, 1, dtype=self.dtype, name="pool_conv")(jnp.where(m, pooled, 0)))
        h = GroupNorm(self.num_groups, name="norm")(jnp.concatenate(branches, axis=-1), mask)
        return jnp.where(m, nn.relu(h), 0)


@ENCODERS.register("inception1d")
class InceptionTimeEncoder(EncoderBase):
    """InceptionTime (Fawaz et al., 2020, "InceptionTime: finding AlexNet for time series
    classification"; one of the PTB-XL benchmark's models, Strodthoff et al., 2021) with GroupNorm
    in place of BatchNorm, on a waveform [B, T, C] or on spectrogram frames [B, frames, bins].

    `inception_modules` modules (6), a residual shortcut (1x1 convolution + norm) around every 3;
    each module: a 1x1 bottleneck to `bottleneck` channels, convolutions of `kernel_sizes` (39,
    19, 9) steps and a max-pool branch, `filters` channels each. The time axis keeps its length;
    tokens are the masked mean of the features over each `patch_size` steps (as the `signal`
    encoder's tokens), projected to `width` and layer-normalized. The time mask (& presence)
    zeroes masked steps first, keeps them out of the statistics and the max pool and re-zeroes
    them after each module; the token mask is the time mask max-pooled over each patch (a token is
    real when any step in it is), & present. A tail shorter than a patch is zero-padded and masked.
    `depth` and `num_heads` (the Transformer's) are unused.
    """

    kind = "signal"

    patch_size: int = 50
    filters: int = 32
    bottleneck: int = 32
    kernel_sizes: tuple[int, ...] = (39, 19, 9)
    inception_modules: int = 6
    norm_groups: int = 32

    def token_stride(self):
        return self.patch_size

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, time_mask = inputs["values"], inputs["mask"] & inputs["present"][:, None]  # [B, T, C], [B, T]
        p = self.patch_size
        pad = ((0, 0), (0, -x.shape[1] % p))
        mask = jnp.pad(time_mask, pad)
        x = jnp.where(mask[..., None], jnp.pad(x, pad + ((0, 0),)), 0).astype(self.dtype)
        m = mask[..., None]
        residual = x
        for i in range(self.inception_modules):
            x = InceptionModule(self.filters, self.bottleneck, tuple(self.kernel_sizes), self.norm_groups, self.dtype,
                                name=f"module{i}")(x, mask)
            if i % 3 == 2:
                shortcut = Conv1D(x.shape[-1], 1, dtype=self.dtype, name=f"shortcut{i}")(residual)
                shortcut = GroupNorm(self.norm_groups, name=f"shortcut{i}_norm")(shortcut, mask)
                x = residual = jnp.where(m, nn.relu(x + shortcut), 0)
        summed = einops.reduce(x.astype(jnp.float32), "b (n p) c -> b n c", "sum", p=p)
        count = einops.reduce(mask.astype(jnp.float32), "b (n p) -> b n", "sum", p=p)
        tokens = (summed / jnp.maximum(count, 1.0)[..., None]).astype(self.dtype)
        tokens = LayerNorm(name="norm")(Dense(self.width, dtype=self.dtype, name="token_projection")(tokens))
        token_mask = count > 0
        return jnp.where(token_mask[..., None], tokens, 0).astype(self.dtype), token_mask
