"""Shared layers, built for speed on XLA:CPU as well as GPU.

- `Dense` flattens every leading dimension before its matmul: a `[B, T, D]` input becomes one
  `[B*T, D] @ [D, F]` GEMM. XLA:CPU computes the kernel gradient of the batched form about 2x
  slower than of the flat form.
- `LayerNorm` has a closed-form backward pass (`jax.custom_vjp`; measured faster in one probe,
  slower in another: see the README performance section): two reductions instead of the
  chain autodiff builds, computed in float32 whatever the activation dtype.
- `MultiHeadAttention` projects q, k, v with one fused `Dense` when they share an input, masks
  with a large finite negative (no NaN for fully masked rows) and zeroes the output of a query
  that has no key to attend to, so masked content can never leak through a uniform softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype | str
_NEG = -1e9


class Dense(nn.Module):
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y.reshape(*lead, self.features)


@jax.custom_vjp
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    inv = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    xhat = centered * inv
    y = (xhat * scale + bias).astype(x.dtype)
    return y, (xhat, inv, scale)


def _layer_norm_bwd(res, g):
    xhat, inv, scale = res
    gf = g.astype(jnp.float32)
    lead = tuple(range(gf.ndim - 1))
    d_bias = jnp.sum(gf, axis=lead)
    d_scale = jnp.sum(gf * xhat, axis=lead)
    gs = gf * scale
    dx = inv * (gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
    return dx.astype(g.dtype), d_scale, d_bias, None


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        return _layer_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.eps)


class MLP(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.gelu(Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return Dense(d, dtype=self.dtype, name="fc2")(x)


class MultiHeadAttention(nn.Module):
    """Masked multi-head attention. mask: bool [B, Tq, Tk], True where query may attend key.

    Returns (output [B, Tq, D], attention weights [B, heads, Tq, Tk]).
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_in, kv_in, mask):
        d = q_in.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        if kv_in is q_in:
            qkv = Dense(3 * d, dtype=self.dtype, name="qkv")(q_in)
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            q = Dense(d, dtype=self.dtype, name="q")(q_in)
            k, v = jnp.split(Dense(2 * d, dtype=self.dtype, name="kv")(kv_in), 2, axis=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, hd)
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        logits = jnp.where(mask[:, None], logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1)
        # A query with no key to attend to would average masked values uniformly: zero it instead.
        has_key = jnp.any(mask, axis=-1)  # [B, Tq]
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        out = out.reshape(out.shape[0], out.shape[1], d) * has_key[..., None].astype(self.dtype)
        return Dense(d, dtype=self.dtype, name="out")(out), weights * has_key[:, None, :, None]


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block. x: [B, T, D], mask: bool [B, T]."""

    num_heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        pair = mask[:, :, None] & mask[:, None, :]
        h = LayerNorm(name="ln1")(x).astype(self.dtype)
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(h, h, pair)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = LayerNorm(name="ln2")(x).astype(self.dtype)
        h = MLP(self.mlp_ratio * x.shape[-1], dtype=self.dtype, name="mlp")(h)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


def masked_mean(x, mask, axis=1):
    """Mean of x [B, T, D] over the True entries of mask [B, T]; zero where none is True."""
    m = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)
