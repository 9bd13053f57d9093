"""The training state: everything a resumed run needs besides the data iterator's position."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # the run's base key; each step folds its step number in
