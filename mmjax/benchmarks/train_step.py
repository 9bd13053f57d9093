"""Train-step benchmark: compile time, step time, steps/s, examples/s, the fraction of a training
loop's wall time spent inside the compiled step, and peak memory.

    python -m mmjax.training.benchmark [--config=experiments/synthetic_patients.py[:args]] \
        [--config.model.dtype=bfloat16] [--steps=30]
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
from absl import app, flags
from ml_collections import config_flags

from mmjax import losses
from mmjax.data import pipeline
from mmjax.training import parallel
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import TrainState, create_state
from mmjax.training.step import make_train_step
from mmjax.training.train import build_model, class_weight_arrays, loss_settings, loss_weights, parse_list

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


def setup(config) -> StepSetup:
    """Builds the pipeline, model, optimizer, first state and jitted step of `config`."""
    builder = pipeline.builder_from_config(config.data)
    spec = pipeline.DatasetSpec.from_builder(builder)
    tasks = spec.select_tasks(parse_list(config.tasks))
    kw = dict(modalities=parse_list(config.modalities), tasks=tasks, text_max_length=config.data.text_max_length,
              spectrogram=config.data.spectrogram)
    it = iter(pipeline.train_loader(builder, spec, config.train.batch_size, config.seed, augment=config.data.augment,
                                    worker_count=config.data.worker_count, shard_index=0, shard_count=1, **kw))
    model = build_model(config, spec, tasks)
    tx = make_optimizer(config.optimizer, config.train.num_steps)
    mesh = parallel.make_mesh()
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    host_batch = next(it)
    batch = parallel.global_batch(host_batch, shard)
    loss_kw = dict(loss_settings(config),
                   class_weights=class_weight_arrays(config, tasks, spec.split_sizes.get("train")))
    loss_state = losses.init_loss_state(loss_kw["task_weighting"], tasks)
    state = jax.jit(lambda rng: create_state(model, tx, batch, rng, loss_state), out_shardings=repl)(
        jax.random.PRNGKey(0))
    train_step = make_train_step(model, tx, tasks, loss_weights(config, spec, tasks), **loss_kw)
    step_fn = jax.jit(train_step, in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0)
    return StepSetup(config, tuple(tasks), model, tx, it, host_batch, batch, state, train_step, step_fn, shard)


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


def benchmark(config, steps: int, prepared: StepSetup | None = None) -> dict:
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
    t = time.perf_counter()  # the training loop's shape: fresh data every step, no host sync
    for _ in range(steps):
        state, m = compiled(state, parallel.global_batch(next(it), shard))
    jax.block_until_ready(m)
    loop_s = (time.perf_counter() - t) / steps
    return {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "cpus": os.cpu_count(),
        "batch_size": config.train.batch_size, "dtype": config.model.dtype, "fusion": config.model.fusion.name,
        "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
        "compile_s": round(compile_s, 2), "step_ms": round(step_s * 1e3, 1), "steps_per_s": round(1 / step_s, 2),
        "examples_per_s": round(config.train.batch_size / step_s, 1), "loop_step_ms": round(loop_s * 1e3, 1),
        "fraction_in_step": round(step_s / loop_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main():
    # Flags defined here, not at import, so that other entry points (the sweep) can import this module.
    config = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT), "Experiment config.",
                                             lock_config=True)
    steps = flags.DEFINE_integer("steps", 30, "Timed steps (after 3 warm-up steps).")
    app.run(lambda argv: print(json.dumps(benchmark(config.value, steps.value))))


if __name__ == "__main__":
    main()
