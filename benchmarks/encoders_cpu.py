"""The convolutional, recurrent and MLP encoders, forward + backward (jit), with mmjax's layers against
the same encoder built from stock flax layers: which to keep on XLA:CPU.

    python benchmarks/encoders_cpu.py [--batch=16 --repeats=7]

Each row swaps the layers an encoder module uses (its module globals, so the encoder's code is the
same) and prints the median milliseconds of `repeats` timed runs after a compile and a warm-up:
  mmjax        what the encoder uses: nn.Conv for 2-D, for resnet1d and for InceptionTime's long
               kernels, Conv1D (flat GEMMs) for InceptionTime's 1x1 ones, layers.GroupNorm
               (masked, two-pass), ProjectedCell (the input projected for every step in one GEMM
               before the scan), layers.Dense
  im2col       an im2col Conv2D (one GEMM over the k*k shifted views) instead of nn.Conv (resnet)
  flax 1x1     nn.Conv instead of Conv1D for InceptionTime's 1x1 convolutions
  Conv1D       Conv1D instead of nn.Conv (resnet1d)
  Conv1D long  Conv1D instead of nn.Conv for InceptionTime's 39/19/9-step kernels
  flax norm    nn.GroupNorm (its `mask`) instead of layers.GroupNorm
  flax cell    nn.GRUCell / nn.OptimizedLSTMCell in nn.RNN on the embeddings
  flax dense   nn.Dense instead of layers.Dense
Shapes: 32x32 grey images, 10 s of 12-lead ECG at 100 Hz, 64-token texts, 40 lab columns; about a
quarter of each batch's time steps / tokens masked. Not part of the library or of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.encoders import ENCODERS, inception1d, mlp, resnet, resnet1d, rnn
from mmjax.models.layers import Conv1D


class FlaxConv1D(nn.Module):
    features: int
    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (self.kernel_size,), (self.stride,), padding="SAME", dtype=self.dtype)(x)


class FlaxGroupNorm(nn.Module):
    num_groups: int = 32
    eps: float = 1e-5
    scale_init: object = nn.initializers.ones

    @nn.compact
    def __call__(self, x, mask=None):
        mask = None if mask is None else jnp.broadcast_to(mask[..., None], x.shape)
        return nn.GroupNorm(min(self.num_groups, x.shape[-1]), epsilon=self.eps, scale_init=self.scale_init)(
            x, mask=mask)


def im2col_conv(features, kernel, stride, dtype, name):
    return Im2colConv2D(features, kernel, stride, dtype, name=name)


class Im2colConv2D(nn.Module):
    """'SAME' 2-D convolution as one GEMM over the k*k shifted views side by side."""

    features: int
    kernel_size: int
    stride: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        k, s, (b, h, w, c) = self.kernel_size, self.stride, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c, self.features))
        oh, ow = -(-h // s), -(-w // s)
        ph, pw = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
        x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        views = [x[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s] for i in range(k) for j in range(k)]
        y = jnp.concatenate(views, -1).reshape(b * oh * ow, k * k * c) @ kernel.reshape(k * k * c, -1)
        return y.reshape(b, oh, ow, self.features)


def conv1d_long(features, kernel, dtype, name):
    return Conv1D(features, kernel, dtype=dtype, name=name)


def conv1d(features, kernel, stride, dtype, name):
    return Conv1D(features, kernel, stride, dtype=dtype, name=name)


class FlaxRecurrence(nn.Module):
    cell: str
    features: int
    reverse: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, lengths):
        cell = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}[self.cell](self.features, dtype=self.dtype)
        return nn.RNN(cell, reverse=self.reverse, keep_order=True)(x, seq_lengths=lengths)


@contextlib.contextmanager
def swapped(module, **names):
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def inputs(kind, b, rng):
    present = np.ones(b, bool)
    if kind == "image":
        return {"values": rng.normal(size=(b, 32, 32, 1)).astype(np.float32), "present": present}
    if kind == "text":
        mask = np.arange(64)[None] < rng.integers(32, 65, b)[:, None]
        return {"values": rng.integers(2, 1000, (b, 64)).astype(np.int32) * mask, "mask": mask, "present": present}
    if kind == "tabular":
        return {"values": rng.normal(size=(b, 40)).astype(np.float32), "mask": rng.random((b, 40)) < 0.75,
                "categories": rng.integers(0, 4, (b, 4)).astype(np.int32), "present": present}
    mask = np.arange(1000)[None] < rng.integers(500, 1001, b)[:, None]
    return {"values": rng.normal(size=(b, 1000, 12)).astype(np.float32) * mask[..., None], "mask": mask,
            "present": present}


def time_ms(encoder, batch, repeats):
    params = jax.jit(encoder.init)(jax.random.PRNGKey(0), batch)

    def loss(p, batch):
        tokens, mask = encoder.apply(p, batch)
        return jnp.sum(jnp.where(mask[..., None], tokens, 0) ** 2)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params, batch))
    jax.block_until_ready(grad(params, batch))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(grad(params, batch))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


CASES = [  # name, settings, {variant: (module, swaps)}
    ("resnet", {"stages": "small", "base_channels": 32}, {
        "im2col": (resnet, {"_conv": im2col_conv}), "flax norm": (resnet, {"GroupNorm": FlaxGroupNorm})}),
    ("resnet1d", {"stages": "18", "base_channels": 32}, {
        "Conv1D": (resnet1d, {"conv": conv1d}), "flax norm": (resnet1d, {"GroupNorm": FlaxGroupNorm})}),
    ("inception1d", {"filters": 16, "bottleneck": 16}, {
        "flax 1x1": (inception1d, {"Conv1D": FlaxConv1D}), "flax norm": (inception1d, {"GroupNorm": FlaxGroupNorm}),
        "Conv1D long": (inception1d, {"long_conv": conv1d_long})}),
    ("rnn", {"vocab_size": 1000, "hidden": 64, "cell": "gru"}, {"flax cell": (rnn, {"Recurrence": FlaxRecurrence})}),
    ("rnn", {"vocab_size": 1000, "hidden": 64, "cell": "lstm"}, {"flax cell": (rnn, {"Recurrence": FlaxRecurrence})}),
    ("mlp", {"category_sizes": (6, 6, 6, 6), "hidden": 256}, {"flax dense": (mlp, {"Dense": nn.Dense})}),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {a.batch}, width {a.width}, "
          f"median of {a.repeats}, forward + backward ms")
    for name, settings, variants in CASES:
        cls = ENCODERS.get(name)
        batch = inputs(cls.kind, a.batch, np.random.default_rng(0))
        encoder = cls(width=a.width, **settings)
        row = {"mmjax": time_ms(encoder, batch, a.repeats)}
        for variant, (module, swaps) in variants.items():
            with swapped(module, **swaps):
                row[variant] = time_ms(encoder, batch, a.repeats)
        label = name + "".join(f" {k}={v}" for k, v in settings.items() if k in ("stages", "cell"))
        print(f"{label:22s}" + "  ".join(f"{k} {v:8.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
