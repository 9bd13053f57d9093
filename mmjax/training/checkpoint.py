"""Orbax checkpoints: the train state and the data iterator's position, saved together.

Asynchronous saves every `every` steps; kept: the latest `keep` and the best one by the
validation metric passed at save time (higher is better, or lower for errors such as
`los.mae`).

Resume order, in `train.py`: this run's own workdir (everything; `init_from` is then not used),
else `init_from` (parameters only, no optimizer state or data position), else a fresh start.
`init_from` is another run's workdir or checkpoint folder; `init_params` names which top-level
parameter subtrees to take from it (default: all, and the two models must then be the same):
`--config.init_params=image_encoder` warm-starts one encoder pretrained on another dataset,
`xray_encoder=image_encoder` loads the source's `image_encoder` into this model's `xray_encoder`.
Everything not named keeps its fresh initialization; the source's other subtrees are not read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmjax.console import UserError, quiet_absl
from mmjax.training.state import TrainState


def _best_fn(metric: str, lower_is_better: bool):
    """The value orbax ranks checkpoints by (higher is better): the metric, negated for errors; NaN worst."""
    sign = -1.0 if lower_is_better else 1.0

    def value(m):
        v = float(m[metric])
        return sign * v if v == v else -float("inf")

    return value


@functools.cache  # a process-wide registration: once
def _single_process_array_saving() -> None:
    """In one process, each replicated array is written once, from its first device. Orbax's default on
    CPU splits every replicated array across the replicas ("replica-parallel" saving, for multi-host
    writes), slicing each on its device: one dispatched and compiled slice per parameter shape and
    device, 18 s of 4 saves of the tabular smoke model on 8 CPU devices here."""
    if jax.process_count() == 1:
        with quiet_absl():  # Orbax warns that it overrides its handler: what was asked for
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def make_manager(directory: str, every: int, keep: int, metric: str = "macro_auroc",
                 lower_is_better: bool = False) -> ocp.CheckpointManager:
    _single_process_array_saving()
    rank = _best_fn(metric, lower_is_better)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes the manager store each save's metrics, without which BestN sees none and keeps nothing
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, preservation_policy=policy,
                                           best_fn=rank, best_mode="max",
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data"))


def _open_read_only(directory: str, options: dict, **kwargs) -> ocp.CheckpointManager:
    """A read-only manager (`options`: more CheckpointManagerOptions). Orbax warns three times on opening
    one (it sets save_interval_steps=0 and create=False, the directory is read-only): what was asked
    for, so kept off the console."""
    with quiet_absl():
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, **options),
                                     **kwargs)


def best_step(directory: str, metric: str = "macro_auroc", lower_is_better: bool = False) -> tuple[int, str]:
    """(step, how it was chosen): the best checkpoint by the validation `metric` stored with it, else
    (no metric stored: a run without validation, or saved before metrics were stored) the latest."""
    directory = checkpoint_directory(directory)
    options = dict(best_fn=_best_fn(metric, lower_is_better), best_mode="max")
    with _open_read_only(directory, options, item_names=("state", "data")) as manager:
        step, how = manager.best_step(), f"best by validation {metric}"
        if step is None or manager.metrics(step) is None:
            step, how = manager.latest_step(), "latest: no validation metric stored with the checkpoints"
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint found")
    return int(step), how


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


def parse_subtrees(spec: str) -> dict[str, str]:
    """`config.init_params` as {this model's subtree: the source run's subtree}.

    'image_encoder' -> {'image_encoder': 'image_encoder'}; 'xray_encoder=image_encoder' loads the
    source's `image_encoder` into this model's `xray_encoder`; entries are separated by ',' (or '+').
    Empty: {} (every parameter)."""
    subtrees = {}
    for entry in spec.replace("+", ",").split(","):
        if not entry.strip():
            continue
        target, sep, source = (s.strip() for s in entry.partition("="))
        source = source if sep else target
        if not target or not source:
            raise ValueError(f"init_params={spec!r}: entry {entry!r} is not 'name' or 'target=source'")
        if target in subtrees:
            raise ValueError(f"init_params={spec!r}: {target!r} is named twice")
        subtrees[target] = source
    return subtrees


def checkpoint_directory(directory: str) -> str:
    """The checkpoints folder of a workdir, or `directory` itself when it is one."""
    directory = os.path.abspath(directory)
    nested = os.path.join(directory, "checkpoints")
    return nested if os.path.isdir(nested) else directory


def restore_params(directory: str, params, step: int | None = None, subtrees: Mapping[str, str] | None = None,
                   label: str = "init_from="):
    """(params, step): `params` with subtrees replaced by another run's (`init_from`), from its latest
    checkpoint or `step`.

    `subtrees` maps top-level names of `params` to top-level names in the checkpoint ({} or None:
    all of them, and then the two trees must have the same names). Only the named subtrees are read
    (Orbax partial restore); the rest of `params` is returned as given, and the source's other
    subtrees, optimizer state and data position are ignored, so the source may be another model on
    another dataset. Within a loaded subtree, names and shapes must match; values take the dtypes of
    `params` (arrays, or `jax.ShapeDtypeStruct`s when everything is loaded). Errors name the source
    as `label` + directory (the setting a user gave it)."""
    directory = checkpoint_directory(directory)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    with _open_read_only(directory, {}, item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{label}{directory}: no checkpoint found")
        if step not in manager.all_steps():
            raise UserError(f"{label}{directory}: no checkpoint of step {step}; the steps saved are "
                            f"{sorted(manager.all_steps())}")
        where = f"{label}{directory} step {step}"
        saved = manager.item_metadata(step)["state"]  # names, shapes and dtypes; no array is read
        saved = getattr(saved, "tree", saved)["params"]
        pairs = dict(subtrees) if subtrees else {name: name for name in params}
        _check_subtrees(where, params, saved, pairs, everything=not subtrees)
        wanted = {"params": {source: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[source])
                             for source in set(pairs.values())}}
        # numpy: independent of the devices the source was saved from; partial_restore: orbax >= 0.11.16
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            wanted, restore_args=as_numpy, partial_restore=True)))
    loaded = restored["state"]["params"]
    out = dict(params)
    for target, source in pairs.items():
        out[target] = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), params[target], loaded[source])
    return out, step


def _check_subtrees(where: str, params, saved, pairs: dict, everything: bool) -> None:
    """Raises, naming the subtree or parameter, unless each target in `pairs` and its source match."""
    unknown = sorted(t for t in pairs if t not in params)
    if unknown:
        raise ValueError(f"init_params: this model has no subtree {unknown}; it has {sorted(params)}")
    missing = sorted(s for s in pairs.values() if s not in saved)
    if missing and not everything:
        raise ValueError(f"{where} has no subtree {missing}; it has {sorted(saved)}")
    for target, source in pairs.items():
        renamed = "" if source == target else f" (from {source!r})"
        want = jax.tree_util.tree_flatten_with_path(params[target])[0]
        got = dict(jax.tree_util.tree_flatten_with_path(saved.get(source, {}))[0])
        for path, leaf in want:
            name = f"[{target!r}]" + jax.tree_util.keystr(path)
            if path not in got:
                raise ValueError(f"{where}: parameter {name}{renamed} is missing")
            if tuple(got[path].shape) != tuple(leaf.shape):
                raise ValueError(f"{where}: parameter {name}{renamed} has shape {tuple(got[path].shape)}, "
                                 f"this model needs {tuple(leaf.shape)}")
        extra = sorted(set(map(jax.tree_util.keystr, got)) - {jax.tree_util.keystr(p) for p, _ in want})
        if extra:
            raise ValueError(f"{where}: subtree {source!r} has parameters that this model's {target!r} "
                             f"lacks: {extra[:5]}")
    extra = sorted(set(saved) - set(params)) if everything else []
    if extra:
        raise ValueError(f"{where}: unexpected parameters {extra[:5]}; init_params names the subtrees to "
                         "load when the models differ")
