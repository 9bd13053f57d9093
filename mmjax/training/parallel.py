"""Data parallelism: a named mesh (the main path) or pmap (the alternative), and multi-process setup.

Mesh path: the state replicated (or FSDP: sharded over the devices, `MeshStrategy('fsdp')`), the
batch sharded on the `data` axis, the step jitted once with the state donated. Pmap path: the state
replicated on every local device, the batch split into `[devices, B / devices, ...]`, the same step
function reducing with `psum`.

`make_strategy(config.parallel, config.sharding)` gives the object the train loop and evaluation
use for either: it owns jitting, device placement, host transfer and restore, so the loop never
asks which.
"""

from __future__ import annotations

import collections
import inspect
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.training import checkpoint

DATA_AXIS = "data"


# The environments jax.distributed.initialize() reads a multi-process job from (its own cluster detection):
# the variables present in every process of a SLURM step (srun) and of an Open MPI job (mpirun).
CLUSTER_ENVIRONMENTS = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
}
# A peer that stops answering (killed, its node lost) ends the job after this long: JAX's coordination
# service stops every process (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_S = 20


def cluster_environment() -> str | None:
    """The cluster whose multi-process job this process is part of (its environment names more than one
    process), or None."""
    for name, names in CLUSTER_ENVIRONMENTS.items():
        if all(k in os.environ for k in names):
            count = os.environ[names[2] if name == "SLURM" else names[1]]
            if count.isdigit() and int(count) > 1:
                return name
    return None


def maybe_initialize_distributed(requested: bool = False, coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """`jax.distributed.initialize` when a multi-process job is asked for: explicitly (the address, process
    count and id: launch.py's `--coordinator_address`, `--num_processes`, `--process_id`), by
    `config.distributed`, by `JAX_COORDINATOR_ADDRESS`, or by a SLURM step or Open MPI job of more than
    one process (JAX then reads everything from their environment). CPU processes reduce over gloo.
    Returns whether this process is part of a multi-process job."""
    if jax.distributed.is_initialized():
        return True
    explicit = bool(coordinator_address)
    if not (explicit or requested or "JAX_COORDINATOR_ADDRESS" in os.environ or cluster_environment()):
        return False
    if explicit and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes (>= 1) and "
                         f"--process_id (0 to num_processes - 1); got {num_processes} and {process_id}")
    try:  # collectives between CPU processes (the default before some jax versions is none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a jax without the option has gloo by default
        pass
    kwargs = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    if explicit:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    return True


def barrier(name: str) -> None:
    """Every process waits here until all have come (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def abstract_state(state):
    """Shapes, dtypes and shardings of a state's arrays (what a restore fills)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# FSDP leaves arrays smaller than this replicated: their gathers would cost more than they save
FSDP_MIN_SIZE = 2**10


def fsdp_spec(shape: tuple, n: int) -> P:
    """The `data` axis on the array's largest dimension that `n` devices divide (the last of equals:
    a kernel's output features), else replicated."""
    dims = [d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n]
    if n == 1 or not dims or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    d = max(dims, key=lambda i: (shape[i], i))
    return P(*([None] * d), DATA_AXIS)


class MeshStrategy:
    """jit over a named mesh: the batch sharded on `data`, the state donated, and the state replicated
    (`sharding='replicated'`) or sharded over `data` too (`'fsdp'`: each parameter and its optimizer
    moments split on one dimension; XLA gathers them where the step needs them whole)."""

    name = "mesh"

    def __init__(self, sharding: str = "replicated"):
        if sharding not in ("replicated", "fsdp"):
            raise ValueError(f"sharding={sharding!r}: use 'replicated' or 'fsdp'")
        self.sharding = sharding
        self.mesh = make_mesh()
        self.replicated = replicated(self.mesh)
        self.batch_sharding = batch_sharding(self.mesh)
        self.state_sharding = None  # FSDP: the state's shardings, leaf by leaf (set by create_state)

    def shardings(self, abstract):
        """The sharding of each array of `abstract` (shapes) under this strategy."""
        if self.sharding == "replicated":
            return jax.tree.map(lambda _: self.replicated, abstract)
        n = self.mesh.shape[DATA_AXIS]
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(tuple(x.shape), n)), abstract)

    def create_state(self, init, rng):
        """`init(rng)` jitted with the state created in its shardings (never whole on one device or the host)."""
        if self.sharding == "fsdp":  # per array, from the shapes (a replicated state needs no trace for it)
            self.state_sharding = self.shardings(jax.eval_shape(init, rng))
        return jax.jit(init, out_shardings=self.state_sharding or self.replicated)(rng)

    def place(self, state):
        """The state (created or restored by `create_state`'s shardings) as the step takes it."""
        return state

    def put_params(self, params):
        """Parameters from elsewhere (a warm start) in the state's shardings."""
        return jax.device_put(params, self.state_sharding.params if self.state_sharding else self.replicated)

    def host_state(self, state):
        """The state as checkpoints hold it: one copy of each array (sharded arrays are saved by shard)."""
        return state

    def put(self, local_batch: dict) -> dict:
        return global_batch(local_batch, self.batch_sharding)

    def train_step(self, make_step):
        """`make_step(axis_name, num_shards)` -> the pure step; returns it compiled, state donated."""
        state = self.state_sharding or self.replicated
        return jax.jit(make_step(None, 1), in_shardings=(state, self.batch_sharding),
                       out_shardings=(state, self.replicated), donate_argnums=0)

    def predictor(self, eval_step):
        """predict(params, host batch) -> this process's rows of the predictions, on the host."""
        params = self.state_sharding.params if self.state_sharding else self.replicated
        step = jax.jit(eval_step, in_shardings=(params, self.batch_sharding))
        return lambda params, batch: jax.tree.map(local_rows, step(params, self.put(batch)))

    def restore(self, manager, state, step: int | None = None):
        """(state, data state) of checkpoint `step` (default: the latest), placed as `state` is."""
        return checkpoint.restore(manager, abstract_state(state), step)


class PmapStrategy(MeshStrategy):
    """jax.pmap: a copy of the state per local device, the batch split `[devices, B / devices, ...]`,
    the same pure step reducing with psum over `data`."""

    name = "pmap"

    def place(self, state):
        return replicate(jax.device_get(state))

    def host_state(self, state):
        return unreplicate(state)

    def put(self, local_batch: dict) -> dict:
        return split_for_pmap(local_batch)

    def train_step(self, make_step):
        return jax.pmap(make_step(DATA_AXIS, jax.device_count()), axis_name=DATA_AXIS, donate_argnums=0)

    def predictor(self, eval_step):
        step = jax.pmap(eval_step, axis_name=DATA_AXIS)
        return lambda params, batch: jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]),
                                                  step(params, self.put(batch)))

    def restore(self, manager, state, step: int | None = None):
        # the template is one device's copy (the state is host arrays when a finished run is relaunched)
        template = jax.device_put(jax.device_get(self.host_state(state)), jax.devices()[0])
        restored, data = checkpoint.restore(manager, abstract_state(template), step)
        return self.place(restored), data


def prefetch_to_device(batches: Iterator[dict], size: int, put: Callable[[dict], Any]) -> Iterator:
    """`put(batch)` for each host batch, `size` batches ahead: the transfers of the next batches are
    issued (asynchronously) before the step that needs them, so the device never waits on a copy that
    could have started during the previous step. `size` 0: one batch at a time, as read."""
    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:  # a finite iterator's last batches
        yield queue.popleft()


def make_strategy(name: str, sharding: str = "replicated") -> MeshStrategy:
    """`config.parallel`: 'mesh' (jit over a named mesh) or 'pmap'; `config.sharding` (mesh only):
    'replicated' or 'fsdp'."""
    strategies = {s.name: s for s in (MeshStrategy, PmapStrategy)}
    if name not in strategies:
        raise ValueError(f"parallel={name!r}: use 'mesh' or 'pmap'")
    if name == "pmap":
        if sharding != "replicated":
            raise ValueError(f"sharding={sharding!r} needs parallel='mesh' (pmap keeps a whole copy per device)")
        return PmapStrategy()
    return MeshStrategy(sharding)


def state_bytes_per_device(state) -> int:
    """Bytes of `state`'s arrays held on the first device (a pmap state: its first copy)."""
    device, total = jax.devices()[0], 0
    for x in jax.tree.leaves(state):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
        else:
            total += np.asarray(x).nbytes
    return total
