"""Train-step benchmark: compile time, step time, steps/s, examples/s, the fraction of a training
loop's wall time spent inside the compiled step, model FLOPs and MFU, and memory.

    python -m mmjax.benchmarks.train_step [--config=experiments/synthetic_patients.py[:args]] \
        [--config.model.dtype=bfloat16] [--steps=30]

Printed as one JSON object. `step_ms`: the compiled step on one batch, repeated (state donated, no
host sync); `loop_step_ms`: the training loop's shape (fresh batches from the input pipeline, put
on the device `data.device_prefetch` steps ahead as `fit` does), timed after enough untimed steps to
use up what the pipeline read ahead during compilation; `input_share`: the part of the loop's
step the step itself does not explain (1 - step / loop: the input pipeline's cost). `model_tflops_per_step`
counts the model's FLOPs from the jaxpr of the step without rematerialization (`mmjax/benchmarks/flops.py`:
recomputation is not counted, as MFU is defined); `mfu`: its matmul FLOPs per second over the
devices' peak for the compute dtype (`fusion_scaling.peak_flops`: a data sheet, TF32's for float32
on a GPU since XLA's float32 matmuls use it there, or this machine's measured matmul ceiling).
Memory: the compiled step's analysis (`temp_mib`: activations and other temporaries) and, on GPU,
the device's peak in use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import flags

from mmjax import console
from mmjax.benchmarks import flops, fusion_scaling
from mmjax.data import pipeline
from mmjax.experiment import Experiment
from mmjax.training import parallel
from mmjax.training.state import TrainState

_DEFAULT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "synthetic_patients.py")


@dataclasses.dataclass
class StepSetup:
    """A default-config train step ready to time: what `benchmark` and `benchmarks/` share."""

    config: Any
    tasks: tuple
    model: Any
    tx: Any
    batches: Iterator  # host batches from the training pipeline
    host_batch: dict  # one host batch (numpy), the one `batch` was made from
    batch: dict  # that batch as global device arrays
    state: TrainState
    train_step: Callable  # the pure step function
    step_fn: Callable  # train_step jitted with shardings, state donated
    shard: Any
    loss_weights: dict  # the fixed task weights, parsed ({task: weight})


def setup(config) -> StepSetup:
    """Builds the pipeline, model, optimizer, first state and jitted step of `config`."""
    exp = Experiment.from_config(config)
    it = iter(exp.train_loader(config.train.batch_size, shard_index=0, shard_count=1))
    strategy = parallel.MeshStrategy()
    host_batch = next(it)
    batch = strategy.put(host_batch)
    state = strategy.create_state(exp.init_state, jax.random.PRNGKey(0))
    train_step = exp.train_step()
    step_fn = strategy.train_step(lambda axis, shards: train_step)
    return StepSetup(config, exp.tasks, exp.model, exp.optimizer, it, host_batch, batch, state, train_step, step_fn,
                     strategy.batch_sharding, exp.loss_weights)


@contextlib.contextmanager
def compilation_cache_setting(option: str, value):
    """JAX's config `option` (one of the persistent compilation cache's) set to `value` inside. JAX
    decides once whether the cache is used; it is made to decide again on the way in and out."""
    from jax.experimental.compilation_cache import compilation_cache

    before = getattr(jax.config, option)
    jax.config.update(option, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update(option, before)
        compilation_cache.reset_cache()


def compilation_cache_off():
    """JAX's persistent compilation cache off inside (when one is set: `JAX_COMPILATION_CACHE_DIR`, the
    sweep's, the tests'), so that a compilation timed here compiles rather than reads a stored executable."""
    return compilation_cache_setting("jax_enable_compilation_cache", False)


def model_flops(config, s: StepSetup) -> dict:
    """FLOPs of one train step of `config`'s model counted from its jaxpr, without rematerialization."""
    step = s.train_step
    if config.model.get("remat"):
        plain = config.copy_and_resolve_references()
        plain.model.remat = ""
        step = Experiment.from_config(plain).train_step()
    return flops.count(step, s.state, s.batch)


def benchmark(config, steps: int, prepared: StepSetup | None = None, loop_warmup: int | None = None) -> dict:
    """The row of figures (see the module docstring). `loop_warmup` untimed loop steps come before the
    timed ones (default: the pipeline's read-ahead and the device prefetch), so that the loop is timed
    in its steady state, not while it drains the batches read ahead during compilation."""
    s = prepared or setup(config)
    state, batch, it, shard = s.state, s.batch, s.batches, s.shard
    with compilation_cache_off():
        t = time.perf_counter()
        compiled = s.step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
    for _ in range(3):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / steps
    # the training loop's shape: fresh data every step, put ahead, no host sync
    ahead = (config.get("data") or {}).get("device_prefetch", 2)
    batches = parallel.prefetch_to_device(it, ahead, lambda b: parallel.global_batch(b, shard))
    for _ in range(pipeline.READ_AHEAD_MAX + ahead + 2 if loop_warmup is None else loop_warmup):
        state, m = compiled(state, next(batches))
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, next(batches))
    jax.block_until_ready(m)
    loop_s = (time.perf_counter() - t) / steps
    counted = model_flops(config, s) if s.model is not None else None
    mem = fusion_scaling.memory(compiled)
    extra = {}
    if counted:
        peak, source = fusion_scaling.peak_flops(config.model.dtype)
        peak *= jax.device_count()  # the step is the global batch's, over every device
        extra = {"model_tflops_per_step": round(counted["total"] / 1e12, 4),
                 "achieved_tflops": round(counted["total"] / step_s / 1e12, 3),
                 "peak_tflops": round(peak / 1e12, 2), "peak_source": source,
                 "mfu": round(counted["matmul"] / step_s / peak, 6)}
    if mem:
        extra.update(temp_mib=round(mem["temp_bytes"] / 2**20, 1),
                     executable_mib=round(mem["executable_bytes"] / 2**20, 1))
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        extra["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "cpus": os.cpu_count(),
        "batch_size": config.train.batch_size, "dtype": config.model.dtype, "fusion": config.model.fusion.name,
        "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
        "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 1), "steps_per_s": round(1 / step_s, 2),
        "examples_per_s": round(config.train.batch_size / step_s, 1), "loop_step_ms": round(loop_s * 1e3, 1),
        "fraction_in_step": round(step_s / loop_s, 3), "input_share": round(max(0.0, 1 - step_s / loop_s), 3),
        "remat": config.model.get("remat", ""), **extra,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main():
    # Flags defined here, not at import, so that other entry points (the sweep) can import this module.
    config = console.define_config_flag("config", os.path.normpath(_DEFAULT), "Experiment config.")
    steps = flags.DEFINE_integer("steps", 30, "Timed steps (after 3 warm-up steps).")
    console.run(lambda argv: print(json.dumps(benchmark(config.value, steps.value))))


if __name__ == "__main__":
    main()
