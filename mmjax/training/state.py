"""The training state: everything a resumed run needs besides the data iterator's position."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # the run's base key; each step folds its step number in
    # What the task weighting carries between steps (`losses.init_loss_state`): DWA's window sums and
    # means; {} for the other weightings.
    loss_state: Any = struct.field(default_factory=dict)


def create_state(model, tx, template_batch, rng, loss_state: dict | None = None) -> TrainState:
    """Fresh parameters (initialized on `template_batch`'s shapes), optimizer state, step 0."""
    k_params, k_dropout, k_run = jax.random.split(rng, 3)
    # jitted: flax's init run eagerly dispatches (and compiles) op by op, 61 s for the smoke model here
    params = jax.jit(lambda b: model.init({"params": k_params, "dropout": k_dropout}, b, train=False))(
        template_batch)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=k_run,
                      loss_state=loss_state or {})
