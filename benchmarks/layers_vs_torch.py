"""Shared layers, forward + backward, against flax.linen's and PyTorch eager's: where a straightforward
flax model loses time to PyTorch on XLA:CPU, and whether mmjax's layers win it back.

    pip install torch  # optional: without it the PyTorch column is skipped
    python benchmarks/layers_vs_torch.py [--batch=64 --tokens=164 --width=128]

Not part of the library (which never imports PyTorch) or of the tests.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import layers


def _time(fn, repeats=20):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def jax_ms(module, x):
    params = module.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1)))
    return _time(lambda: jax.block_until_ready(grad(params, x)))


def torch_ms(kind, x, width):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    t = torch.tensor(np.asarray(x), requires_grad=True)
    mod = {"dense": torch.nn.Linear(width, 4 * width), "layernorm": torch.nn.LayerNorm(width, eps=1e-6),
           "gelu": torch.nn.GELU(approximate="tanh")}[kind]

    def step():
        out = mod(t)
        (out**2).sum().backward()

    return _time(step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=164)
    ap.add_argument("--width", type=int, default=128)
    a = ap.parse_args()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(a.batch, a.tokens, a.width)).astype(np.float32))

    class Gelu(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.gelu(x)

    rows = {
        "dense": (nn.Dense(4 * a.width), layers.Dense(4 * a.width)),
        "layernorm": (nn.LayerNorm(epsilon=1e-6), layers.LayerNorm()),
        "gelu": (Gelu(), Gelu()),
    }
    for kind, (flax_mod, mmjax_mod) in rows.items():
        result = {"layer": kind, "shape": list(x.shape), "flax_ms": round(jax_ms(flax_mod, x), 2),
                  "mmjax_ms": round(jax_ms(mmjax_mod, x), 2)}
        t = torch_ms(kind, x, a.width)
        if t is not None:
            result["torch_eager_ms"] = round(t, 2)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
