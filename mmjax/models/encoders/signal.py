"""The default signal encoder (`signal`): a strided CNN tokenizer and a Transformer."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase
from mmjax.models.layers import Conv1D, Dense


@ENCODERS.register("signal")
class SignalEncoder(EncoderBase):
    """A strided 1-D CNN tokenizer, then a Transformer over the tokens.

    Three convolutions (strides 1, 5, `patch_size // 5`) turn the waveform into one token per
    `patch_size` steps; the last layer's receptive field (~1.6 s at 100 Hz with the defaults)
    spans two beats, so a token can see the local RR interval and P-wave shape that separate
    atrial fibrillation from sinus rhythm. `conv=False` gives a plain linear patch tokenizer.
    A length that does not divide into patches keeps its tail: zero-padded, its padding masked.
    """

    kind = "signal"

    patch_size: int = 50
    conv: bool = True
    channels: int = 32

    def token_stride(self):
        return self.patch_size

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, time_mask = inputs["values"], inputs["mask"]  # [B, T, C], [B, T]
        p = self.patch_size
        if x.shape[1] <= p:
            raise ValueError(f"signal of {x.shape[1]} steps with patch_size={p} would make a single token "
                             f"(with the spectrogram front end, T is the number of frames): lower patch_size")
        t = -(-x.shape[1] // p) * p
        pad = ((0, 0), (0, t - x.shape[1]))
        time_mask = jnp.pad(time_mask, pad)
        x = jnp.where(time_mask[..., None], jnp.pad(x, pad + ((0, 0),)), 0).astype(self.dtype)
        if self.conv:
            if p % 5:
                raise ValueError(f"signal patch_size={p} must be a multiple of 5 with the conv tokenizer")
            c = self.channels
            x = nn.gelu(Conv1D(c // 2, 9, dtype=self.dtype, name="conv1")(x))
            x = nn.gelu(Conv1D(c, 9, 5, dtype=self.dtype, name="conv2")(x))
            k = 3 * (p // 5)  # spans ~3 token lengths of input
            tokens = Conv1D(self.width, k, p // 5, dtype=self.dtype, name="conv3")(x)
        else:
            tokens = Dense(self.width, dtype=self.dtype, name="patch_embedding")(
                einops.rearrange(x, "b (n p) c -> b n (p c)", p=p))
        mask = einops.reduce(time_mask, "b (n p) -> b n", "max", p=p) & inputs["present"][:, None]
        return self.trunk(tokens, mask, train), mask
