"""`train_and_evaluate(config, workdir)`: the research loop, top to bottom.

Sections: setup, data, model and optimizer, state and shardings, restore, steps, evaluation,
loop, final test. The config is described in `experiments/synthetic_patients.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from mmjax import losses
from mmjax.data import pipeline
from mmjax.data.spec import parse_mapping, truncation
from mmjax.evaluation import evaluate
from mmjax.evaluation import run as evaluation_run
from mmjax.models.build import build_model as _build_model
from mmjax.models.model import MultimodalModel
from mmjax.training import checkpoint, parallel
from mmjax.training.logging import MetricWriter
from mmjax.training.optimizer import learning_rate_schedule, make_optimizer
from mmjax.training.state import create_state
from mmjax.training.step import make_eval_step, make_train_step


class _CompileCounter:
    """Counts the executables XLA builds (a jitted function compiles once per input shape), or loads
    from JAX's persistent compilation cache when one is set (`JAX_COMPILATION_CACHE_DIR`)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def _on_event(self, name, **kwargs):
        if name == "/jax/compilation_cache/cache_hits":
            self.count += 1


_COMPILES = _CompileCounter()


# Settings no result depends on: a sweep (`sweep.py`) reads back a finished run whatever its value of them.
NO_RESULT_DEPENDS = frozenset({"train.figures"})


def parse_list(value: str, known=None, what="value") -> tuple[str, ...]:
    items = tuple(v for v in value.replace("+", ",").split(",") if v) if value else ()
    if known is not None:
        unknown = [v for v in items if v not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; choose from {list(known)}")
    return items


def loss_weights(config, spec, tasks) -> dict:
    """Fixed task weights: 1 unless the config says otherwise; weights of the dataset's tasks that this
    run does not train are ignored with a warning; a name that is no task of the dataset is an error."""
    weights = {k: float(v) for k, v in parse_mapping(config.loss.weights, "loss.weights").items()}
    unknown = sorted(set(weights) - {t.name for t in spec.tasks})
    if unknown:
        raise ValueError(f"loss.weights names unknown task(s) {unknown}; dataset {spec.name!r} has "
                         f"{[t.name for t in spec.tasks]}")
    unused = sorted(set(weights) - {t.name for t in tasks})
    if unused:
        logging.warning("loss.weights for task(s) %s ignored: not selected by config.tasks", unused)
        print(f"Warning: loss.weights for {unused} ignored (those tasks are not trained)", flush=True)
    return {t.name: weights.get(t.name, 1.0) for t in tasks}


def class_weight_arrays(config, tasks, num_train: int | None = None) -> dict:
    """{task: class weights (multiclass) or positive weights (multilabel, binary)} from `loss.class_weights`
    ('task=balanced' or 'task=1:2:0.5'); `num_train`: the training split's size ('balanced' positives)."""
    setting = parse_mapping(config.loss.get("class_weights", ""), "loss.class_weights")
    known = {t.name: t for t in tasks}
    unknown = sorted(set(setting) - set(known))
    if unknown:
        raise ValueError(f"loss.class_weights names task(s) {unknown} not trained; tasks are {sorted(known)}")
    return {name: losses.class_weights(known[name], v, num_train) for name, v in setting.items()}


def task_weighting(config) -> losses.TaskWeighting:
    """`loss.task_weighting`; the older `loss.uncertainty_weighting=True` means 'uncertainty'."""
    c = config.loss
    kind = c.get("task_weighting", "fixed")
    if c.get("uncertainty_weighting", False):
        if kind not in ("fixed", "uncertainty"):
            raise ValueError(f"loss.uncertainty_weighting=True conflicts with loss.task_weighting={kind!r}")
        kind = "uncertainty"
    return losses.TaskWeighting(kind, int(c.get("dwa_window", 50)), float(c.get("dwa_temperature", 2.0)))


def loss_settings(config) -> dict:
    """The train step's loss keywords besides the task and class weights."""
    c = config.loss
    gamma, alpha = float(c.get("focal_gamma", 0.0)), float(c.get("focal_alpha", -1.0))
    if gamma < 0 or not (alpha == -1.0 or 0.0 <= alpha <= 1.0):
        raise ValueError(f"loss.focal_gamma={gamma} must be >= 0 and loss.focal_alpha={alpha} in [0, 1] or -1 (off)")
    return dict(modality_heads_weight=float(c.modality_heads_weight), task_weighting=task_weighting(config),
                focal_gamma=gamma, focal_alpha=None if alpha == -1.0 else alpha)


def build_model(config, spec, tasks) -> MultimodalModel:
    """The experiment's model for the dataset's selected modalities (`config.modalities`, default all)."""
    return _build_model(config.model, spec.select_modalities(parse_list(config.modalities)), tasks,
                        modality_heads=config.loss.modality_heads_weight > 0,
                        uncertainty_weighting=task_weighting(config).kind == "uncertainty")


def metric_value(results: dict, name: str) -> float:
    """A metric by dotted path: 'macro_auroc', 'answer.accuracy', 'findings.macro_auroc'."""
    value = results
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"best_metric={name!r}: no {key!r} in the evaluation results; "
                           f"top level has {sorted(results)}")
        value = value[key]
    return float(value)


def lower_is_better(metric: str) -> bool:
    """Errors and losses (mae, rmse, ..._loss) are minimized; every other metric maximized."""
    last = metric.rsplit(".", 1)[-1]
    return last in ("mae", "rmse", "brier", "ece") or last.endswith("loss")


def report_truncation(spec, names, max_length: int) -> None:
    """Says how many training texts of each text modality are cut at `max_length` tokens."""
    for m in spec.select_modalities(names):
        if m.kind == "text":
            t = truncation(m, max_length)
            if t["truncated"]:
                print(f"Note: {t['truncated']} of {t['texts']} training texts of {m.name!r} ({t['fraction']:.1%}) "
                      f"are longer than text_max_length={max_length} tokens and are truncated (by "
                      f"{t['tokens_lost_mean']:.0f} tokens on average; the longest has {t['max_tokens']})", flush=True)


def _local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def train_and_evaluate(config, workdir: str) -> dict:
    # ---- Setup -------------------------------------------------------------------------------
    parallel.maybe_initialize_distributed(config.distributed)
    if config.parallel not in ("mesh", "pmap"):
        raise ValueError(f"parallel={config.parallel!r}: use 'mesh' or 'pmap'")
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    num_steps, batch_size = config.train.num_steps, config.train.batch_size
    n_proc, n_dev = jax.process_count(), jax.device_count()
    for name, size in (("train.batch_size", batch_size), ("eval_batch_size", config.eval_batch_size)):
        if size % n_dev:
            raise ValueError(f"{name}={size} must be divisible by the {n_dev} devices")

    # ---- Data --------------------------------------------------------------------------------
    data = config.data
    builder = pipeline.builder_from_config(data)
    spec = pipeline.DatasetSpec.from_builder(builder)
    tasks = spec.select_tasks(parse_list(config.tasks))
    modalities = tuple(m.name for m in spec.select_modalities(parse_list(config.modalities)))
    weights = loss_weights(config, spec, tasks)
    class_weights = class_weight_arrays(config, tasks, spec.split_sizes.get("train"))
    loss_kw = dict(loss_settings(config), class_weights=class_weights)
    if is_main:
        spec.save(os.path.join(workdir, "dataset_spec.json"))  # what evaluation and prediction need
        schema = getattr(getattr(builder, "builder_config", None), "schema", None)  # a manifest's: predict reads it
        if schema is not None:
            shutil.copyfile(schema.path, os.path.join(workdir, evaluation_run.SCHEMA_FILE))
        report_truncation(spec, modalities, data.text_max_length)
    data_kw = dict(modalities=modalities, tasks=tasks, text_max_length=data.text_max_length,
                   spectrogram=data.spectrogram)
    train_loader = pipeline.train_loader(builder, spec, batch_size // n_proc, config.seed, augment=data.augment,
                                         worker_count=data.worker_count, **data_kw)
    train_iter = iter(train_loader)

    windows = int(data.get("signal_eval_windows", 0))
    windowed = tuple(m.name for m in spec.select_modalities(modalities) if m.kind == "signal") if windows else ()

    def eval_iter(split):
        return pipeline.eval_batches(builder, spec, split, config.eval_batch_size // n_proc, signal_windows=windows,
                                     **data_kw)

    # ---- Model and optimizer ---------------------------------------------------------------------
    model = build_model(config, spec, tasks)
    tx = make_optimizer(config.optimizer, num_steps)
    schedule = learning_rate_schedule(config.optimizer, num_steps)
    template = parallel.device_batch(next(pipeline.eval_batches(builder, spec, "train",
                                                                config.eval_batch_size // n_proc, **data_kw)))
    splits = set(builder.info.splits)
    validate = "validation" in splits
    if validate and config.train.checkpoint_every % config.train.eval_every:
        print(f"Warning: train.checkpoint_every={config.train.checkpoint_every} is not a multiple of "
              f"train.eval_every={config.train.eval_every}: the best checkpoint is chosen only among the "
              "checkpoints that fall on an evaluation", flush=True)
    if not validate:
        print("Note: the dataset has no validation split: no validation during training, the last "
              "checkpoint is kept as the best", flush=True)

    # ---- State and shardings ---------------------------------------------------------------------
    mesh = parallel.make_mesh()
    repl, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    loss_state = losses.init_loss_state(loss_kw["task_weighting"], tasks)
    state = jax.jit(lambda rng: create_state(model, tx, template, rng, loss_state), out_shardings=repl)(
        jax.random.PRNGKey(config.seed))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    # ---- Restore: this run's workdir, else init_from, else scratch --------------------------------
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every,
                                      config.train.keep_checkpoints, config.best_metric,
                                      lower_is_better=lower_is_better(config.best_metric))
    def abstract_state(s):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), s)

    if manager.latest_step() is not None:
        state, data_state = checkpoint.restore(manager, abstract_state(state))
        train_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", workdir, int(state.step))
        print(f"Resuming from step {int(state.step)} in {workdir}", flush=True)
    elif config.init_from:
        subtrees = checkpoint.parse_subtrees(config.init_params)  # {}: every parameter
        params, from_step = checkpoint.restore_params(config.init_from, state.params, subtrees=subtrees)
        state = state.replace(params=jax.device_put(params, repl))
        loaded = sum(x.size for name in (subtrees or params) for x in jax.tree.leaves(params[name]))
        what = ", ".join(t if s == t else f"{t} (from {s})" for t, s in subtrees.items()) or "all parameters"
        print(f"Initialized {what} ({loaded:,} of {n_params:,} parameters) from {config.init_from} "
              f"(step {from_step}){'; the rest from scratch' if subtrees else ''}", flush=True)
    elif config.init_params:
        raise ValueError(f"init_params={config.init_params!r} names subtrees to load, but init_from is empty")

    # ---- Steps -------------------------------------------------------------------------------------
    if config.parallel == "mesh":
        train_step = jax.jit(make_train_step(model, tx, tasks, weights, **loss_kw),
                             in_shardings=(repl, data_sharding),
                             out_shardings=(repl, repl), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, tasks, windowed), in_shardings=(repl, data_sharding))
        put = lambda b: parallel.global_batch(b, data_sharding)
        host_state = lambda s: s
    else:
        train_step = jax.pmap(make_train_step(model, tx, tasks, weights, axis_name=parallel.DATA_AXIS,
                                              num_shards=n_dev, **loss_kw),
                              axis_name=parallel.DATA_AXIS, donate_argnums=0)
        eval_step = jax.pmap(make_eval_step(model, tasks, windowed), axis_name=parallel.DATA_AXIS)
        put = parallel.split_for_pmap
        state = parallel.replicate(jax.device_get(state))
        host_state = parallel.unreplicate

    def restore_step(s):
        """The train state of checkpoint `s`, placed as the loop's state is."""
        if config.parallel == "pmap":  # the state is host arrays here when a finished run is relaunched
            template = jax.device_put(jax.device_get(host_state(state)), jax.devices()[0])
            restored, _ = checkpoint.restore(manager, abstract_state(template), s)
            return parallel.replicate(jax.device_get(restored))
        return checkpoint.restore(manager, abstract_state(state), s)[0]

    def predict(params, batch):
        out = eval_step(params, put(batch))
        if config.parallel == "mesh":
            return jax.tree.map(_local_rows, out)
        return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), out)

    # ---- Evaluation --------------------------------------------------------------------------------
    collected = {}  # split -> (preds, labels, masks, patient ids) of its last evaluation

    def run_eval(split):
        params = state.params
        preds, labels, masks, ids = evaluate.collect(lambda b: predict(params, b), eval_iter(split), tasks,
                                                     with_ids=True)
        if n_proc > 1:
            from jax.experimental import multihost_utils

            # strings do not gather; stable 64-bit codes do, as 8 bytes each (int64 would be cut to int32 without x64)
            codes = evaluate.id_codes(ids).view(np.uint8).reshape(-1, 8)
            preds, labels, masks, codes = multihost_utils.process_allgather((preds, labels, masks, codes), tiled=True)
            ids = np.ascontiguousarray(np.asarray(codes, np.uint8)).view(np.int64).ravel()
        collected[split] = (preds, labels, masks, ids)
        return evaluate.compute_metrics(preds, labels, masks, tasks)

    # ---- Loop --------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, num_steps, batch_size)
    step = int(jax.device_get(host_state(state).step))
    start_step, pending, data_wait, results = step, [], 0.0, {}
    stop_at = config.train.stop_at_step or num_steps
    compiles_before = first_step_compiles = None
    first_step_s = None
    run_start = time.perf_counter()

    def flush(pending):
        """Fetches the steps' metrics (one host sync per log interval); fails on non-finite values."""
        values = []
        for s, m in jax.device_get(pending):
            m = {k: float(np.mean(v)) for k, v in m.items()}  # pmap metrics carry a device axis
            bad = {k: v for k, v in m.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
            if bad:
                raise FloatingPointError(f"non-finite {', '.join(bad)} at step {s}: {bad}; stopping the run")
            values.append(m)
        return values

    while step < min(num_steps, stop_at):
        t0 = time.perf_counter()
        batch = next(train_iter)
        data_wait += time.perf_counter() - t0
        if compiles_before is None:
            compiles_before = _COMPILES.count
        state, metrics = train_step(state, put(batch))
        step += 1
        pending.append((step, metrics))
        if first_step_s is None:
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - t0
            first_step_compiles = _COMPILES.count
            writer.reset_clock(step)
        last = step == num_steps or step == stop_at
        if step % config.train.log_every == 0 or last or step % config.train.eval_every == 0:
            values = flush(pending)
            pending = []
            mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
            rates = writer.progress(step, mean["loss"])
            writer.write("train", step, {**mean, **rates, "learning_rate": float(schedule(step - 1))})
        val = None
        if validate and (step % config.train.eval_every == 0 or step == num_steps):
            val = run_eval("validation")
            results["validation"] = val
            writer.write("validation", step, val)
            best = metric_value(val, config.best_metric)
            print(f"step {step}: validation {config.best_metric} {best:.4f}", flush=True)
            writer.reset_clock(step)
        if step % config.train.checkpoint_every == 0 or last:
            metric = {config.best_metric: metric_value(val, config.best_metric)} if val else None
            checkpoint.save(manager, step, host_state(state), train_iter.get_state(), metric, force=last)
    manager.wait_until_finished()
    train_seconds = time.perf_counter() - run_start

    if step < num_steps:  # stopped early on purpose (train.stop_at_step): no final evaluation
        writer.close()
        manager.close()
        return {"stopped_at_step": step}

    # ---- Final test evaluation ---------------------------------------------------------------------
    final = config.train.get("final_checkpoint", "best")
    if final not in ("best", "last"):
        raise ValueError(f"train.final_checkpoint={final!r}: use 'best' or 'last'")
    evaluated_step = step
    if final == "best" and validate and manager.best_step() not in (None, step):
        evaluated_step = manager.best_step()
        state = restore_step(evaluated_step)
        results.pop("validation", None)
        print(f"Final evaluation with the best checkpoint by validation {config.best_metric}: step "
              f"{evaluated_step} of {step}", flush=True)
    if validate and "validation" not in results:
        results["validation"] = run_eval("validation")
    if "test" in splits:
        results["test"] = run_eval("test")
    results = {k: results[k] for k in ("validation", "test") if k in results}
    steps_run = step - start_step
    run_info = {
        "steps_run": steps_run, "evaluated_step": int(evaluated_step), "parameters": int(n_params),
        "devices": n_dev, "processes": n_proc,
        "parallel": config.parallel, "wall_seconds": round(train_seconds, 2),
        "first_step_seconds_incl_compile": round(first_step_s or 0.0, 3),
        "compilations_in_first_step": (first_step_compiles or 0) - (compiles_before or 0),
        "train_step_recompilations_after_first_step": _train_step_cache_size(train_step) - 1,
        "data_wait_fraction": round(data_wait / max(train_seconds, 1e-9), 4),
    }
    if "test" in results:
        writer.write("test", evaluated_step, results["test"])
    writer.write("run", step, run_info)
    if is_main:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({**results, "run": run_info}, f, indent=2)
        print(evaluate.format_table(results, tasks), flush=True)
        recs = {}
        for split in results:  # eval/<split>.json: the metrics with bootstrap intervals, and the predictions
            recs[split] = evaluation_run.write(workdir, split, collected[split], tasks, evaluated_step, config,
                                       reference=collected.get("validation") if split != "validation" else None)
        if "test" in results:
            print(evaluation_run.format_intervals(recs["test"], tasks), flush=True)
            if writer.active and config.train.get("figures", True):
                from mmjax.evaluation.report import main_figures

                try:  # ROC curves, reliability diagrams, confusion matrices as TensorBoard images
                    writer.images(evaluated_step, main_figures(collected["test"], recs["test"], tasks))
                except Exception as e:  # noqa: BLE001  (a figure must not lose the run's results)
                    logging.warning("TensorBoard figures not written: %s: %s", type(e).__name__, e)
    writer.close()
    manager.close()
    return {**results, "run": run_info}


def _train_step_cache_size(fn) -> int:
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else 1
