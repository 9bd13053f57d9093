"""Orbax checkpoints: the train state and the data iterator's position, saved together.

Asynchronous saves every `every` steps; kept: the latest `keep` and the best one by the
validation metric passed at save time (higher is better, or lower for errors such as
`los.mae`). Resume order, in `train.py`: this
run's workdir, then `init_from` (parameters only), then a fresh start.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from mmjax.training.state import TrainState


def make_manager(directory: str, every: int, keep: int, metric: str = "macro_auroc",
                 lower_is_better: bool = False) -> ocp.CheckpointManager:
    sign = -1.0 if lower_is_better else 1.0  # BestN keeps the highest value
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: sign * m[metric], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, preservation_policy=policy,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data"))


def save(manager, step: int, state: TrainState, data_state: dict | None, metrics: dict | None = None,
         force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    return manager.save(step, args=args, metrics=metrics, force=force)


def restore(manager, abstract_state: TrainState, step: int | None = None):
    """(state, data_state) from `step` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def restore_params(directory: str, abstract_params, step: int | None = None):
    """Parameters of another run (`init_from`): its latest checkpoint, or `step`."""
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")  # a workdir was given
    with ocp.CheckpointManager(directory, item_names=("state", "data"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"init_from={directory}: no checkpoint found")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = restored["state"]["params"]
    want = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"init_from={directory} step {step}: parameter {name} is missing")
        if tuple(got[path].shape) != tuple(leaf.shape):
            raise ValueError(f"init_from={directory} step {step}: parameter {name} has shape "
                             f"{tuple(got[path].shape)}, this model needs {tuple(leaf.shape)}")
    if len(got) != len(want):
        extra = sorted(set(map(jax.tree_util.keystr, got)) - set(jax.tree_util.keystr(p) for p, _ in want))
        raise ValueError(f"init_from={directory} step {step}: unexpected parameters {extra[:5]}")
    return jax.tree.map(lambda a, b: jax.numpy.asarray(b, a.dtype), abstract_params, params), step
