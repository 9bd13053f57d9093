"""Data parallelism: a named mesh (the main path) or pmap (the alternative), and multi-process setup.

Mesh path: parameters replicated, the batch sharded on the `data` axis, the step jitted once
with the state donated. Pmap path: the state replicated on every local device, the batch split
into `[devices, B / devices, ...]`, the same step function reducing with `psum`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(requested: bool) -> None:
    """`jax.distributed.initialize()` when the config asks or the environment names a coordinator."""
    env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"))
    if (requested or env) and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: XLA propagates shardings through the model (newer jax defaults to Explicit).
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def device_batch(batch: dict) -> dict:
    """The part of a host batch that goes to devices (ids stay on the host)."""
    return {k: v for k, v in batch.items() if k != "patient_id"}


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> one global array per leaf, sharded over every process's devices."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        device_batch(local_batch))


def split_for_pmap(local_batch: dict) -> dict:
    n = jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {n} local devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, device_batch(local_batch))


def replicate(tree):
    """One copy per local device along a new leading axis (pmap places them on its first call)."""
    n = jax.local_device_count()
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)


def unreplicate(tree):
    """The first device's copy of replicated (pmap) values, as arrays on that device. Reads device 0's
    shard through the host instead of indexing `x[0]`, which dispatches (and compiles) one slice per leaf
    shape: 10 s per run of the smoke model's ~1,000 leaves here."""

    def first(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable and len(x.addressable_shards) > 1:
            shard = x.addressable_data(0)
            value = np.asarray(shard)
            value = value[0] if value.shape[:1] == (1,) and value.ndim == x.ndim else value
            return jax.device_put(value, next(iter(shard.devices())))
        return np.asarray(x)[0]

    return jax.tree.map(first, tree)


def to_host(tree):
    """Fully replicated or addressable global arrays -> numpy (gathers across processes if needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
