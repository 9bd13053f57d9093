"""One encoder per modality, one contract for all of them.

    tokens [B, T, D], token_mask bool [B, T] = encoder(inputs, train=...)

`inputs` is that modality's entry of the batch (`mmjax/batch.py`): `values`, `present` and, for
sequences, `mask`. The token mask is False for every token of an absent modality; the tokens of
an absent modality are zeroed, but correctness never relies on that: fusion uses the mask.

Each modality kind has a default encoder registered under the kind's name (`image`, `text`,
`tabular`, `signal`); a config may name another. A new encoder is one class registered with
`@ENCODERS.register("name")`.
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models.layers import Conv1D, Dense, Dtype, LayerNorm, TransformerBlock
from mmjax.models.registry import Registry

ENCODERS = Registry("encoder")


class _Trunk(nn.Module):
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


class _EncoderBase(nn.Module):
    width: int = 128
    depth: int = 1
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def trunk(self, x, mask, train):
        return _Trunk(self.depth, self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name="trunk")(
            x, mask, train)


@ENCODERS.register("image")
class ImageEncoder(_EncoderBase):
    """ViT-style: non-overlapping `patch_size` patches, a linear embedding, a Transformer."""

    patch_size: int = 8

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


@ENCODERS.register("text")
class TextEncoder(_EncoderBase):
    """Token embedding and a Transformer over the token mask."""

    vocab_size: int = 1000

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        ids = inputs["values"]  # [B, L]
        emb = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embedding")
        mask = inputs["mask"] & inputs["present"][:, None]
        return self.trunk(emb(ids).astype(self.dtype), mask, train), mask


@ENCODERS.register("tabular")
class TabularEncoder(_EncoderBase):
    """Feature tokenizer (FT-Transformer), one token per column, then a Transformer across them.

    Numeric column f: token = x_f * w_f + b_f, or a learned embedding when the value is missing.
    Categorical column g: a learned embedding per training category, plus one for a missing value
    (index 0) and one for a category never seen in training (index 1); `category_sizes[g]` rows.
    """

    category_sizes: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, observed = inputs["values"], inputs["mask"]  # [B, F]
        b, f = x.shape
        init = nn.initializers.normal(0.02)
        parts = []
        if f:
            w = self.param("feature_weight", init, (f, self.width), jnp.float32)
            bias = self.param("feature_bias", init, (f, self.width), jnp.float32)
            missing = self.param("missing_embedding", init, (f, self.width), jnp.float32)
            parts.append(jnp.where(observed[..., None], x[..., None] * w + bias, missing))
        if self.category_sizes:
            cats = inputs["categories"]  # [B, G]
            if cats.shape[1] != len(self.category_sizes):
                raise ValueError(f"{cats.shape[1]} categorical columns, the encoder was built for "
                                 f"{len(self.category_sizes)}")
            offsets = jnp.asarray(np.cumsum((0,) + tuple(self.category_sizes[:-1])), jnp.int32)
            table = self.param("category_embedding", init, (sum(self.category_sizes), self.width), jnp.float32)
            parts.append(table[cats + offsets])
        tokens = jnp.concatenate(parts, axis=1).astype(self.dtype)
        mask = jnp.broadcast_to(inputs["present"][:, None], tokens.shape[:2])
        return self.trunk(tokens, mask, train), mask


@ENCODERS.register("signal")
class SignalEncoder(_EncoderBase):
    """A strided 1-D CNN tokenizer, then a Transformer over the tokens.

    Three convolutions (strides 1, 5, `patch_size // 5`) turn the waveform into one token per
    `patch_size` steps; the last layer's receptive field (~1.6 s at 100 Hz with the defaults)
    spans two beats, so a token can see the local RR interval and P-wave shape that separate
    atrial fibrillation from sinus rhythm. `conv=False` gives a plain linear patch tokenizer.
    A length that does not divide into patches keeps its tail: zero-padded, its padding masked.
    """

    patch_size: int = 50
    conv: bool = True
    channels: int = 32

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
