"""Shared layers, built for speed on XLA:CPU as well as GPU.

- `Dense` flattens every leading dimension before its matmul: a `[B, T, D]` input becomes one
  `[B*T, D] @ [D, F]` GEMM. XLA:CPU computes the kernel gradient of the batched form about 2x
  slower than of the flat form.
- `LayerNorm` has a closed-form backward pass (`jax.custom_vjp`): two reductions instead of the
  chain autodiff builds, computed in float32 whatever the activation dtype. Alone it is slower
  than autodiff's; inside the train step level with it or ahead (docs/performance.md).
- `MultiHeadAttention` projects q, k, v with one fused `Dense` for self-attention, attends one
  head at a time (no head transposes), normalizes the softmax after the value matmul, masks
  with a large finite negative (no NaN for fully masked rows) and zeroes the output of a query
  that has no key to attend to, so masked content can never leak through a uniform softmax.
- `Conv1D` is a 'SAME' 1-D convolution as flat GEMMs over blocked input (XLA:CPU's
  convolution is ~2.5x slower, forward plus backward, on the signal tokenizer).
- `GroupNorm` takes a mask of valid positions (padded time steps stay out of the statistics) and
  stays finite when a sample has none (an absent modality), where `nn.GroupNorm`'s masked mean
  is 0/0. Two-pass statistics in float32, summed over positions before groups: as fast as
  `nn.GroupNorm` forward plus backward, 2-5x faster than reducing a [B, N, groups, C/groups] view.
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
    """Masked multi-head attention.

        out [B, Tq, D], weights [B, heads, Tq, Tk] = MultiHeadAttention(heads)(x, mask)

    `mask` bool [B, Tq, Tk] is True where a query may attend a key. Self-attention (no `context`)
    projects q, k, v with one fused `qkv` Dense; with `context` [B, Tk, D], q comes from `x` and
    k, v from `context`. `segments` (static, e.g. `(0, 16, 80)`) restricts attention to the
    diagonal blocks `[lo, hi)` (per-modality self-attention over concatenated tokens, with one
    projection for all of them); then only those blocks of `mask` are read and `weights` is None.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, context=None, segments=None):
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        if segments is not None:
            if context is not None:
                raise ValueError("segments are for self-attention (no context)")
            if segments[0] != 0 or segments[-1] != x.shape[1] or any(a > b for a, b in zip(segments, segments[1:])):
                raise ValueError(f"segments {tuple(segments)} must rise from 0 to the {x.shape[1]} tokens")
        if context is None:
            q, k, v = jnp.split(Dense(3 * d, dtype=self.dtype, name="qkv")(x), 3, axis=-1)
        else:
            q = Dense(d, dtype=self.dtype, name="q")(x)
            k, v = jnp.split(Dense(2 * d, dtype=self.dtype, name="kv")(context), 2, axis=-1)
        if segments is None:
            out, weights = _attend(q, k, v, mask, self.num_heads, self.dtype)
        else:
            blocks = [(lo, hi) for lo, hi in zip(segments[:-1], segments[1:]) if hi > lo]
            out = jnp.concatenate([_attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi, lo:hi],
                                           self.num_heads, self.dtype)[0] for lo, hi in blocks], axis=1)
            weights = None
        return Dense(d, dtype=self.dtype, name="out")(out), weights


def fused_attention_applies(dtype) -> bool:
    """Whether attention goes through `jax.nn.dot_product_attention` (cuDNN's fused kernel where the
    shapes and masks allow, JAX's own otherwise): on a GPU in half precision, the kernel's domain.
    Elsewhere mmjax's attention, written for XLA:CPU, is the faster."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _attend_fused(q, k, v, mask, num_heads, dtype, implementation=None):
    """`_attend` through `jax.nn.dot_product_attention` (`implementation`: None lets JAX pick cuDNN
    where it can, 'xla' its reference): the same output, a query with no key zeroed as there; the
    weights are the reference formula's (XLA drops them when unused, as in training)."""
    b, tq, d = q.shape
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, d // num_heads)
    out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask[:, None],
                                       implementation=implementation).reshape(b, tq, d)
    has_key = jnp.any(mask, axis=-1, keepdims=True)
    weights = _attend(q, k, v, mask, num_heads, dtype, fused=False)[1]
    return jnp.where(has_key, out, 0).astype(dtype), weights


def _attend(q, k, v, mask, num_heads, dtype, fused: bool | None = None):
    """softmax(q k^T / sqrt(hd)) v per head, for q [B, Tq, D], k and v [B, Tk, D], mask [B, Tq, Tk];
    returns (out [B, Tq, D], weights [B, heads, Tq, Tk]).

    Written for XLA:CPU, each choice measured (docs/performance.md): one head at a time on a
    slice of the feature axis (`[B, T, hd]` matmuls batched over B alone, no head transposes);
    the 1/sqrt(hd) scale on q, not on the logits; the softmax normalized after the second matmul
    (out = (e v) / sum(e), a [B, Tq, hd] division instead of a [B, Tq, Tk] one). A query with no
    key to attend to would average masked values uniformly: its output is zeroed instead.
    Masking is additive (-1e9), which excludes a masked key exactly as long as logits are finite
    and far below 1e9 in size: the batch contract keeps masked content finite (zeros).
    `weights` costs nothing when unused (XLA drops it). `fused` (default: `fused_attention_applies`):
    through `jax.nn.dot_product_attention` instead (`_attend_fused`).
    """
    if fused if fused is not None else fused_attention_applies(dtype):
        return _attend_fused(q, k, v, mask, num_heads, dtype)
    hd = q.shape[-1] // num_heads
    bias = jnp.where(mask, 0.0, _NEG).astype(jnp.float32)  # shared by the heads
    has_key = jnp.any(mask, axis=-1, keepdims=True).astype(jnp.float32)  # [B, Tq, 1]
    q = q * jnp.asarray(1 / np.sqrt(hd), q.dtype)
    outs, weights = [], []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = jnp.einsum("bqd,bkd->bqk", q[..., sl], k[..., sl]).astype(jnp.float32) + bias
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        norm = has_key / jnp.sum(e, axis=-1, keepdims=True)  # [B, Tq, 1]; 0 for a query with no key
        outs.append((jnp.einsum("bqk,bkd->bqd", e.astype(dtype), v[..., sl]) * norm).astype(dtype))
        weights.append(e * norm)
    return jnp.concatenate(outs, axis=-1), jnp.stack(weights, axis=1)


class Conv1D(nn.Module):
    """1-D convolution with 'SAME' padding and the parameters of `flax.linen.Conv` (`kernel`
    [k, in, out], `bias`), computed with flat GEMMs instead of `lax.conv_general_dilated`.

    The padded input is cut into blocks of `stride` steps; output t reads blocks t .. t+r-1
    (r = ceil(k / stride), the kernel zero-padded to r * stride taps). Then whichever
    intermediate is smaller: the r shifted blocks side by side, one GEMM (im2col, when
    stride * in <= out), or one GEMM of every block with all r kernel slices, its r outputs
    summed with shifts. Forward plus backward of the default signal tokenizer (2-core CPU):
    17-26 ms with `lax.conv_general_dilated`, 8-11 ms with im2col alone, 6.6-7.1 ms so.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, C] -> [B, ceil(T / stride), features]
        k, s, f, (b, n, c) = self.kernel_size, self.stride, self.features, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, c, f), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (f,), self.param_dtype)
        out, r = -(-n // s), -(-k // s)
        lo = max((out - 1) * s + k - n, 0) // 2
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (lo, (out - 1 + r) * s - n - lo), (0, 0)))
        blocks = x.reshape(b, out - 1 + r, s * c)
        kernel = jnp.pad(kernel, ((0, r * s - k), (0, 0), (0, 0))).reshape(r, s * c, f).astype(self.dtype)
        if r == 1:
            y = jnp.dot(blocks.reshape(b * out, s * c), kernel[0])
        elif s * c <= f:
            patches = jnp.concatenate([blocks[:, j:j + out] for j in range(r)], axis=-1)
            y = jnp.dot(patches.reshape(b * out, r * s * c), kernel.reshape(r * s * c, f))
        else:
            z = jnp.dot(blocks.reshape(-1, s * c), kernel.transpose(1, 0, 2).reshape(s * c, r * f),
                        preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))  # sums in >= f32
            z = z.reshape(b, out - 1 + r, r, f)
            y = sum(z[:, j:j + out, j] for j in range(r)).astype(self.dtype)
        return y.reshape(b, out, f) + bias.astype(self.dtype)


class GroupNorm(nn.Module):
    """Group normalization (Wu & He, 2018) of x [B, ..., C] over all axes but the batch, per group
    of channels, with the parameters of `flax.linen.GroupNorm` (`scale`, `bias`).

    `mask` bool [B, ...] (x's shape less the channels) keeps the positions where it is False out
    of the mean and variance (they are still normalized); a sample with no True position gets
    mean 0 and variance 0 instead of NaN. `num_groups` is capped at the channel count.
    """

    num_groups: int = 32
    eps: float = 1e-5
    scale_init: Callable = nn.initializers.ones
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, c = x.shape[0], x.shape[-1]
        g = min(self.num_groups, c)
        if c % g:
            raise ValueError(f"{c} channels do not divide into {g} groups")
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        xf = x.astype(jnp.float32).reshape(b, -1, c)  # [B, N, C]: sums over N first, then within groups
        m = None if mask is None else mask.reshape(b, -1, 1).astype(jnp.float32)
        count = xf.shape[1] if m is None else jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B, 1]
        count = count * (c // g)

        def group_mean(v):  # [B, N, C] -> [B, 1, C]: the mean over N and the channel's group
            v = jnp.sum(v if m is None else v * m, axis=1).reshape(b, g, c // g)
            return jnp.repeat(jnp.sum(v, axis=-1) / count, c // g, axis=-1)[:, None]

        mean = group_mean(xf)
        centered = xf - mean
        a = jax.lax.rsqrt(group_mean(centered * centered) + self.eps) * scale  # [B, 1, C]
        return (centered * a + bias).reshape(x.shape).astype(x.dtype)


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
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(h, pair)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = LayerNorm(name="ln2")(x).astype(self.dtype)
        h = MLP(self.mlp_ratio * x.shape[-1], dtype=self.dtype, name="mlp")(h)
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


def masked_mean(x, mask, axis=1):
    """Mean of x [B, T, D] over the True entries of mask [B, T]; zero where none is True."""
    m = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)
