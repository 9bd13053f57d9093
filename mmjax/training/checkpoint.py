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
import gc
import logging as std_logging
import os
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

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


def _read_handlers() -> dict:
    """Item handlers that also read each item's metadata (names, shapes, dtypes) without its arrays."""
    return {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


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
    order, how = ranked_steps(directory, metric, lower_is_better)
    return order[0], how


class NonFiniteState(FloatingPointError, UserError):
    """The state to save holds NaN or infinity: it is not saved, and the last good checkpoint stays
    the one a relaunch resumes from."""


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point array of `tree` is finite: one reduction on the devices, one
    boolean to the host."""
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def ranked_steps(directory: str, metric: str = "macro_auroc", lower_is_better: bool = False) -> tuple[list[int], str]:
    """(every checkpoint's step in the order evaluation tries them, how the first was chosen): the best
    by the validation `metric` stored with it (Orbax's choice, as training's), else the latest; then
    the others with the metric, best first, then the rest, newest first."""
    directory = checkpoint_directory(directory)
    rank = _best_fn(metric, lower_is_better)
    with _open_read_only(directory, dict(best_fn=rank, best_mode="max"), item_names=("state", "data")) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{directory}: no checkpoint found")
        scored = {s: manager.metrics(s) for s in steps}
        best, how = manager.best_step(), f"best by validation {metric}"
    if best is None or scored.get(best) is None:
        best, how = steps[0], "latest: no validation metric stored with the checkpoints"
    others = sorted((s for s in steps if s != best and scored[s] and metric in scored[s]),
                    key=lambda s: -rank(scored[s]))
    others += [s for s in steps if s != best and s not in others]
    return [int(best), *others], how


def resume_point(manager) -> str:
    """Which checkpoint a relaunch resumes from, in words (after the saves in flight are committed)."""
    manager.wait_until_finished()
    last = manager.latest_step()
    return f"the last checkpoint, step {last}, is where a relaunch resumes" if last is not None else "no checkpoint"


def save(manager, step: int, state: TrainState, data_state: dict | None, metrics: dict | None = None,
         force: bool = False) -> bool:
    """Saves asynchronously when the manager's interval (or `force`) says so; a non-finite state is
    never saved (`NonFiniteState`), so that it cannot rotate good checkpoints out."""
    if not (force or manager.should_save(step)):
        return False
    if not bool(all_finite(state)):
        raise NonFiniteState(f"the parameters or optimizer state at step {step} are not finite (NaN or inf): not "
                             f"saved; {resume_point(manager)}. A learning rate too high is the usual cause")
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
    with quiet_absl():  # without metrics (no evaluation at this step) Orbax warns at every save
        return manager.save(step, args=args, metrics=metrics, force=force)


def _restore(manager, abstract_state: TrainState, step: int):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def restore(manager, abstract_state: TrainState, step: int | None = None):
    """(state, data_state) from `step`, else from the latest checkpoint that can be read.

    A checkpoint that cannot be read (a truncated or corrupt file) while an earlier one can is moved
    aside to `<checkpoints>.unreadable/<step>` with a warning naming it, and the earlier one is
    restored; training then saves that step anew. When no checkpoint can be read, the newest one's
    error is raised and nothing is moved (the cause is then not one file, e.g. another model)."""
    if step is not None or jax.process_count() > 1:  # several processes would each decide alone
        return _restore(manager, abstract_state, manager.latest_step() if step is None else step)
    unreadable = []
    for s in sorted(manager.all_steps(), reverse=True):
        _check_structure(manager, s, abstract_state)  # another model's checkpoint: an error, not a bad file
        try:
            restored = _restore(manager, abstract_state, s)
        except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for a bad file)
            collect_failed_read()
            unreadable.append((s, e))
            continue
        for bad, error in unreadable:
            _set_aside(manager, bad, error, instead=s)
        if unreadable:
            manager.reload()
        return restored
    if unreadable:
        raise unreadable[0][1]
    raise FileNotFoundError(f"{manager.directory}: no checkpoint found")


def _check_structure(manager, step: int, abstract_state) -> None:
    """Raises ValueError when checkpoint `step` holds other arrays (by shape) than `abstract_state`; a
    metadata file that cannot be read is left to the restore (a bad file)."""
    try:
        with _open_read_only(os.fspath(manager.directory), {}, item_handlers=_read_handlers()) as reader:
            saved = reader.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for a bad file)
        return
    saved = getattr(saved, "tree", saved)
    # the shapes, not the names: Orbax's metadata and the live state spell the paths differently
    saved = sorted(tuple(m.shape) for m in jax.tree.leaves(saved, is_leaf=lambda x: hasattr(x, "shape")))
    wanted = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract_state))
    if saved != wanted:
        raise ValueError(f"checkpoint step {step} in {manager.directory} holds another model's state ({len(saved)} "
                         f"arrays, this run has {len(wanted)}; shapes differ)")


def _set_aside(manager, step: int, error: Exception, instead: int) -> None:
    directory = os.fspath(manager.directory)
    aside = os.path.join(f"{directory}.unreadable", str(step))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    if os.path.exists(aside):
        aside += f".{int(time.time())}"
    os.replace(os.path.join(directory, str(step)), aside)
    logging.warning("checkpoint step %d in %s cannot be read (%s: %s); moved to %s, resuming from step %d",
                    step, directory, type(error).__name__, first_line(error), aside, instead)


def collect_failed_read() -> None:
    """The aftermath of a failed read, kept off the console: Orbax leaves the futures of the other
    arrays holding their errors (collected later, each would log a traceback: collected now, without
    the log), and TensorStore's threads, finishing those reads after Orbax closed its event loop,
    raise "Event loop is closed" once per array (dropped by `_drop_closed_loop_errors`)."""
    _drop_closed_loop_errors()
    logger = std_logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(std_logging.CRITICAL)
    try:
        gc.collect()
    finally:
        logger.setLevel(level)


@functools.cache  # a process-wide hook: installed once, on the first failed read
def _drop_closed_loop_errors() -> None:
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


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
                   label: str = "init_from=", fallbacks: Sequence[int] = ()):
    """(params, step): `params` with subtrees replaced by another run's (`init_from`), from its latest
    checkpoint or `step`; when that checkpoint cannot be read (a corrupt file), from the first of
    `fallbacks` that can, with a warning naming the unreadable one.

    `subtrees` maps top-level names of `params` to top-level names in the checkpoint ({} or None:
    all of them, and then the two trees must have the same names). Only the named subtrees are read
    (Orbax partial restore); the rest of `params` is returned as given, and the source's other
    subtrees, optimizer state and data position are ignored, so the source may be another model on
    another dataset. Within a loaded subtree, names and shapes must match; values take the dtypes of
    `params` (arrays, or `jax.ShapeDtypeStruct`s when everything is loaded). Errors name the source
    as `label` + directory (the setting a user gave it)."""
    directory = checkpoint_directory(directory)
    with _open_read_only(directory, {}, item_handlers=_read_handlers()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{label}{directory}: no checkpoint found")
        if step not in manager.all_steps():
            raise UserError(f"{label}{directory}: no checkpoint of step {step}; the steps saved are "
                            f"{sorted(manager.all_steps())}")
        pairs = dict(subtrees) if subtrees else {name: name for name in params}
        candidates = [step, *(s for s in fallbacks if s != step)]
        for i, s in enumerate(candidates):
            after = candidates[i + 1] if i + 1 < len(candidates) else None
            saved = _or_warn(lambda s=s: _saved_params(manager, s), s, directory, after)
            if saved is None:
                continue
            _check_subtrees(f"{label}{directory} step {s}", params, saved, pairs, everything=not subtrees)
            loaded = _or_warn(lambda s=s, saved=saved: _read_params(manager, s, saved, pairs), s, directory, after)
            if loaded is not None:
                step = s
                break
    out = dict(params)
    for target, source in pairs.items():
        out[target] = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), params[target], loaded[source])
    return out, step


def _or_warn(read, step: int, directory: str, after: int | None):
    """`read()`, or None with a warning when checkpoint `step` cannot be read and `after` is the step
    to try next (the error itself when there is none)."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001  (Orbax and TensorStore raise many kinds for a bad file)
        collect_failed_read()
        if after is None:
            raise
        logging.warning("checkpoint step %d in %s cannot be read (%s: %s); using step %d instead",
                        step, directory, type(e).__name__, first_line(e), after)
        return None


def _saved_params(manager, step: int):
    """The names, shapes and dtypes of checkpoint `step`'s parameters; no array is read."""
    saved = manager.item_metadata(step)["state"]
    return getattr(saved, "tree", saved)["params"]


def _read_params(manager, step: int, saved, pairs: dict) -> dict:
    """The source subtrees of `pairs` from checkpoint `step` (`saved`: its parameters' metadata)."""
    wanted = {"params": {source: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[source])
                         for source in set(pairs.values())}}
    # numpy: independent of the devices the source was saved from; partial_restore: orbax >= 0.11.16
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        wanted, restore_args=as_numpy, partial_restore=True)))
    return restored["state"]["params"]


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
