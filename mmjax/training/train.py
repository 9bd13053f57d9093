"""`train_and_evaluate(config, workdir)`: the research loop, in three phases that each read on one screen.

    init_or_restore  the experiment, the parallel strategy, the state: this run's workdir, else
                     `init_from`, else from scratch
    fit              the steps, validation every `eval_every`, checkpoints every `checkpoint_every`
    finish           the best checkpoint by validation, the final validation and test evaluation,
                     `results.json` and `eval/<split>.json`

What is built (data, model, loss, steps) comes from `mmjax/experiment.py`; how it is placed and
jitted (mesh or pmap) from `mmjax/training/parallel.py`; evaluation from `mmjax/evaluation/`. The
config is described in `experiments/common.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from mmjax.config import ADDED_DEFAULTS, RESUME_MAY_CHANGE, config_differences, flatten, lower_is_better, metric_value
from mmjax.console import ConfigError
from mmjax.data.spec import DatasetSpec, truncation
from mmjax.evaluation import baselines, records
from mmjax.evaluation.format import format_intervals
from mmjax.evaluation.predictor import Predictor
from mmjax.experiment import (
    CHECKPOINTS,
    CONFIG_FILE,
    CONFIG_HISTORY,
    RESOLVED,
    RESULTS_FILE,
    SPEC_FILE,
    Experiment,
    check_divisible,
    resolved_differences,
)
from mmjax.metrics import tasks as task_metrics
from mmjax.training import checkpoint, parallel
from mmjax.training.metric_writer import MetricWriter


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


@functools.cache  # JAX's listeners are process-wide: registered once, on the first run (not at import)
def compile_counter() -> _CompileCounter:
    return _CompileCounter()


@dataclasses.dataclass
class Run:
    """What the loop carries between its phases."""

    exp: Experiment
    workdir: str
    strategy: Any
    state: Any
    train_iter: Any
    manager: Any
    train_step: Any
    predict: Any  # (params, host batch) -> this process's rows of the predictions
    writer: MetricWriter
    validate: bool
    start_step: int
    n_params: int
    state_bytes: int  # the state's bytes on one device


def report_truncation(exp: Experiment) -> None:
    """Says how many training texts of each text modality are cut at `data.text_max_length` tokens."""
    max_length = exp.config.data.text_max_length
    for m in exp.spec.select_modalities(exp.modalities):
        if m.kind == "text":
            t = truncation(m, max_length)
            if t["truncated"]:
                print(f"Note: {t['truncated']} of {t['texts']} training texts of {m.name!r} ({t['fraction']:.1%}) "
                      f"are longer than text_max_length={max_length} tokens and are truncated (by "
                      f"{t['tokens_lost_mean']:.0f} tokens on average; the longest has {t['max_tokens']})", flush=True)


def init_or_restore(config, workdir: str) -> Run:
    """The experiment, its strategy and state; resumed from this workdir's latest checkpoint, else
    warm-started from `init_from`, else fresh."""
    parallel.maybe_initialize_distributed(config.distributed)
    strategy = parallel.make_strategy(config.parallel, config.get("sharding", "replicated"))
    is_main = jax.process_index() == 0
    check_divisible(config)
    resuming = check_resume(config, workdir)  # before the data is prepared or anything written
    if not is_main:  # one process prepares the dataset; the others wait for it, then read it
        parallel.barrier("mmjax: dataset prepared")
    exp = Experiment.from_config(config, workdir)
    if is_main:
        parallel.barrier("mmjax: dataset prepared")
    exp.check()  # config errors and warnings before anything is written or compiled
    if resuming:
        check_same_dataset(exp)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        exp.save()  # config, dataset spec (what evaluation and prediction need), a manifest's schema
        report_truncation(exp)
        note = exp.describe_splits()
        if note:
            print(note, flush=True)
        if exp.recipe["changes"]:
            print(f"Small-data recipe ({exp.recipe['train_rows']} training rows; --config.recipe=standard turns it "
                  f"off): {', '.join(f'{k}={v}' for k, v in exp.recipe['changes'].items())}", flush=True)
        if exp.privacy is not None:
            print(exp.privacy.describe(), flush=True)
        if exp.train_rows is not None:
            d, count = config.data, exp.spec.split_sizes["train"]
            print(f"Label efficiency: training on {len(exp.train_rows)} of {count} training rows (data.label_fraction="
                  f"{d.label_fraction}, data.label_seed={d.get('label_seed', 0)}); the classical baselines fit on the "
                  "same rows", flush=True)
    validate = "validation" in exp.splits
    if validate and config.train.checkpoint_every % config.train.eval_every:
        print(f"Warning: train.checkpoint_every={config.train.checkpoint_every} is not a multiple of "
              f"train.eval_every={config.train.eval_every}: the best checkpoint is chosen only among the "
              "checkpoints that fall on an evaluation", flush=True)
    if not validate:
        print("Note: the dataset has no validation split: no validation during training, the last "
              "checkpoint is kept as the best", flush=True)

    state = strategy.create_state(exp.init_state, jax.random.PRNGKey(config.seed))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = parallel.state_bytes_per_device(state)
    if getattr(strategy, "sharding", "replicated") == "fsdp" and is_main:
        whole = sum(x.nbytes for x in jax.tree.leaves(state))
        print(f"FSDP over {jax.device_count()} devices: the state (parameters and optimizer) takes "
              f"{state_bytes / 2**20:.2f} MiB per device, {whole / 2**20:.2f} MiB whole", flush=True)
    manager = checkpoint.make_manager(exp.path(CHECKPOINTS), config.train.checkpoint_every,
                                      config.train.keep_checkpoints, config.best_metric,
                                      lower_is_better=lower_is_better(config.best_metric))
    try:
        state = _restore_or_warm_start(config, workdir, state, manager, strategy, n_params, exp.model.encoders)
    except BaseException:
        manager.close()
        raise
    state = strategy.place(state)
    train_step = strategy.train_step(lambda axis, shards: exp.train_step(axis_name=axis, num_shards=shards))
    start = int(jax.device_get(strategy.host_state(state).step))
    # the data's position is the step: global batch `start` next, on any number of processes and workers
    train_iter = iter(exp.train_loader(config.train.batch_size // jax.process_count(), start_batch=start))
    if is_main:  # each config that trains a stretch of steps is kept
        exp.save_config(os.path.join(CONFIG_HISTORY, f"from_step_{start}.json"))
        exp.spec.save(exp.path(CONFIG_HISTORY, f"dataset_spec_from_step_{start}.json"))
    writer = MetricWriter(workdir, config.train.num_steps, config.train.batch_size, resume_step=start)
    return Run(exp, workdir, strategy, state, train_iter, manager, train_step, strategy.predictor(exp.eval_step()),
               writer, validate, start, int(n_params), state_bytes)


def _checkpoint_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, CHECKPOINTS)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def _trained_config(workdir: str, latest: int, prefix: str = "from_step_", fallback: str = CONFIG_FILE) -> str | None:
    """The config that trained the latest checkpoint: the last start (`configs/from_step_<N>.json`)
    before it. An attempt that started at `latest` and failed before saving (a NaN, a bad flag) trained
    nothing and does not count. Workdirs from before the history: `config.json`. With `prefix`
    'dataset_spec_from_step_' and `fallback` SPEC_FILE: the dataset spec of that start."""
    history = os.path.join(workdir, CONFIG_HISTORY)
    names = os.listdir(history) if os.path.isdir(history) else []
    starts = sorted(int(n[len(prefix):-len(".json")]) for n in names
                    if n.startswith(prefix) and n[len(prefix):-len(".json")].isdigit())
    before = [s for s in starts if s < latest]
    if before:
        return os.path.join(history, f"{prefix}{before[-1]}.json")
    path = os.path.join(workdir, fallback)
    return path if os.path.exists(path) else None


def check_resume(config, workdir: str) -> bool:
    """True when `workdir` holds checkpoints to resume. The config that trained them must equal
    `config` but for `RESUME_MAY_CHANGE` (how long to train, what to log and keep); otherwise a
    `ConfigError` lists what differs and what to do, before anything is prepared or written,
    unless `--config.allow_config_change=True` (then a warning lists it)."""
    steps = _checkpoint_steps(workdir)
    path = _trained_config(workdir, steps[-1]) if steps else None
    if path is None:
        return bool(steps)
    with open(path) as f:
        before = json.load(f)
    now = json.loads(config.to_json_best_effort())
    flat_before, flat_now = flatten(before), flatten(now)
    differ = config_differences(before, now, RESUME_MAY_CHANGE | RESOLVED, new_keys=False)
    differ += resolved_differences(before, config, workdir)
    listed = "; ".join(f"{k}: {flat_before.get(k, '(none)')!r} -> {flat_now.get(k, '(none)')!r}" for k in differ[:8])
    more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
    if differ and not config.get("allow_config_change", False):
        raise ConfigError(f"{workdir} holds checkpoints (steps {steps}) of a run with another config: {listed}{more}. "
                          "Train in another --workdir, or resume this run with the new values by "
                          "--config.allow_config_change=True")
    if differ:
        print(f"Warning: resuming {workdir} with a changed config (allow_config_change): {listed}{more}", flush=True)
    added = sorted(set(flat_now) - set(flat_before))
    if added:
        print(f"Note: settings added to mmjax since {workdir} was started take their values now: "
              f"{', '.join(f'{k}={flat_now[k]!r}' for k in added)}", flush=True)
    if flat_now.get("privacy.dp") or flat_before.get("privacy.dp"):  # whatever allow_config_change says
        accounted = [k for k in sorted(set(flat_before) | set(flat_now)) if k.startswith("privacy.") or k in (
            "train.num_steps", "train.batch_size", "seed", "data.label_fraction", "data.label_seed")]
        was = lambda k: flat_before.get(k, ADDED_DEFAULTS.get(k))  # a config from before the key existed
        changed = [k for k in accounted if was(k) != flat_now.get(k)]
        if changed:
            raise ConfigError(f"{workdir} holds a run whose DP-SGD noise and privacy accounting depend on "
                              f"{', '.join(f'{k} ({was(k)!r} -> {flat_now.get(k)!r})' for k in changed)}: "
                              "these cannot change on a resume; train in another --workdir")
    if flat_before.get("train.num_steps") not in (None, flat_now.get("train.num_steps")):
        print(f"Note: train.num_steps {flat_before['train.num_steps']} -> {flat_now['train.num_steps']}: the "
              "learning-rate schedule follows the new length from the resumed step on", flush=True)
    return True


def check_same_dataset(exp: Experiment) -> None:
    """A resumed run must read the dataset its checkpoints were trained on: the dataset spec saved by
    the start that trained the latest checkpoint (split sizes, modalities with their statistics and
    vocabularies, tasks) equals the prepared one's, unless `--config.allow_config_change=True`."""
    steps = _checkpoint_steps(exp.workdir)
    path = _trained_config(exp.workdir, steps[-1], "dataset_spec_from_step_", SPEC_FILE) if steps else None
    if path is None:
        return
    before, now = DatasetSpec.load(path).to_metadata(), exp.spec.to_metadata()
    differ = [k for k in now if k != "modalities" and k != "tasks" and before.get(k) != now[k]]
    for group in ("modalities", "tasks"):
        old, new = ({d["name"]: d for d in md.get(group, [])} for md in (before, now))
        differ += [f"{group[:-1] if group == 'tasks' else 'modality'} {n!r}" for n in sorted(set(old) | set(new))
                   if old.get(n) != new.get(n)]
    if not differ:
        return
    message = (f"{exp.workdir}: the prepared dataset differs from the one its checkpoints were trained on "
               f"(in {', '.join(differ)})")
    if not exp.config.get("allow_config_change", False):
        raise ConfigError(message + ". Train in another --workdir, or resume on the new data by "
                          "--config.allow_config_change=True (a manifest dataset prepared before preparation "
                          "1.1 is prepared anew: docs/own_data.md says how to get its old data back)")
    print(f"Warning: {message}; resuming anyway (allow_config_change)", flush=True)


def data_position(config, step: int) -> dict:
    """What a checkpoint records of the data besides the step (which is the data's whole position)."""
    return {"global_batches_read": step, "global_batch_size": config.train.batch_size, "seed": config.seed,
            "processes": jax.process_count(), "worker_count": config.data.get("worker_count", 0)}


def check_data_position(config, data_state: dict, step: int) -> None:
    """The saved data position must be the one the resumed step implies: the same global batch size
    and seed (the process and worker counts may change: the global batches do not). Checkpoints
    written before the position was recorded hold Grain's iterator state, which for one process is
    the same position."""
    if "global_batch_size" not in data_state:
        return
    now = data_position(config, step)
    differ = [k for k in ("global_batch_size", "seed", "global_batches_read") if data_state.get(k) != now[k]]
    if differ:
        saved, wanted = ({k: d.get(k) for k in differ} for d in (data_state, now))
        message = f"the checkpoint of step {step} was written at data position {saved}; this run reads {wanted}"
        if not config.get("allow_config_change", False):
            raise ConfigError(message + ". Resume with the run's own train.batch_size and seed, or train in another "
                              "--workdir")
        print(f"Warning: {message}: the data order is not the one the checkpoints were trained in "
              "(allow_config_change)", flush=True)
    moved = [f"{k} {data_state[k]} -> {now[k]}" for k in ("processes", "worker_count")
             if k in data_state and data_state[k] != now[k]]
    if moved:
        print(f"Note: resuming on another layout ({', '.join(moved)}): the global batches are the same", flush=True)


def _restore_or_warm_start(config, workdir, state, manager, strategy, n_params, encoders=None):
    """The state of this workdir's latest checkpoint, else `init_from`'s parameters in `state`, else
    `state` as it is."""
    if manager.latest_step() is not None:
        state, data_state = checkpoint.restore(manager, parallel.abstract_state(state))
        check_data_position(config, data_state or {}, int(state.step))
        logging.info("resumed from %s at step %d", workdir, int(state.step))
        if jax.process_index() == 0:
            print(f"Resuming from step {int(state.step)} in {workdir}", flush=True)
    elif config.init_from:
        subtrees = checkpoint.parse_subtrees(config.init_params)  # {}: every parameter
        if not subtrees:  # a pretraining workdir (--mode=pretrain): the encoders both models have
            from mmjax.training.pretrain import shared_encoders

            subtrees = shared_encoders(config.init_from, state.params, encoders) or {}
        params, from_step = checkpoint.restore_params(config.init_from, state.params, subtrees=subtrees)
        state = state.replace(params=strategy.put_params(params))
        loaded = sum(x.size for name in (subtrees or params) for x in jax.tree.leaves(params[name]))
        what = ", ".join(t if s == t else f"{t} (from {s})" for t, s in subtrees.items()) or "all parameters"
        print(f"Initialized {what} ({loaded:,} of {n_params:,} parameters) from {config.init_from} "
              f"(step {from_step}){'; the rest from scratch' if subtrees else ''}", flush=True)
    elif config.init_params:
        raise ValueError(f"init_params={config.init_params!r} names subtrees to load, but init_from is empty")
    return state


def _metrics_on(run: Run, split: str) -> tuple:
    """(metrics, collected predictions) of the current parameters on `split`, every process's rows."""
    params = run.state.params
    predictor = Predictor(run.exp, params, 0, predict=run.predict)
    collected = predictor.collect(run.exp.eval_batches(split))
    return task_metrics.compute_metrics(*collected[:3], run.exp.tasks), collected


def _fetch(pending, manager) -> list[dict]:
    """The pending steps' metrics (one host sync per log interval); fails on non-finite values,
    naming the first step that had them and the checkpoint a relaunch resumes from."""
    values = []
    for s, m in jax.device_get(pending):
        m = {k: float(np.mean(v)) for k, v in m.items()}  # pmap metrics carry a device axis
        bad = {k: v for k, v in m.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
        if bad:
            raise checkpoint.NonFiniteState(f"non-finite {', '.join(bad)} at step {s}: {bad}; stopping the run "
                                            f"({checkpoint.resume_point(manager)}). A learning rate too high is the "
                                            "usual cause")
        values.append(m)
    return values


def fit(run: Run) -> dict:
    """Trains to `train.num_steps` (or `train.stop_at_step`); returns the loop's accounting."""
    c, counter = run.exp.config, compile_counter()
    num_steps = c.train.num_steps
    stop_at = c.train.stop_at_step or num_steps
    step, pending, data_wait = run.start_step, [], 0.0
    compiles_before = first_step_compiles = first_step_s = None
    validation, start = None, time.perf_counter()
    # the next batches on the device ahead of the step (the data position is the step: reading ahead moves nothing)
    # (no batch past the last step is read: a run shorter than an epoch never reads one it does not use)
    batches = parallel.prefetch_to_device(itertools.islice(run.train_iter, max(min(num_steps, stop_at) - step, 0)),
                                          c.data.get("device_prefetch", 2), run.strategy.put)
    while step < min(num_steps, stop_at):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        if compiles_before is None:
            compiles_before = counter.count
        run.state, metrics = run.train_step(run.state, batch)
        step += 1
        pending.append((step, metrics))
        if first_step_s is None:
            jax.block_until_ready(metrics)
            first_step_s, first_step_compiles = time.perf_counter() - t0, counter.count
            run.writer.reset_clock(step)
        last = step in (num_steps, stop_at)
        if step % c.train.log_every == 0 or last or step % c.train.eval_every == 0:
            values, pending = _fetch(pending, run.manager), []
            mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
            rates = run.writer.progress(step, mean["loss"])
            run.writer.write("train", step, {**mean, **rates, "learning_rate": run.exp.learning_rate(step - 1)})
        val = None
        if run.validate and (step % c.train.eval_every == 0 or step == num_steps):
            val, collected = _metrics_on(run, "validation")
            validation = (step, val, collected)
            run.writer.write("validation", step, val)
            spent = ""
            if run.exp.privacy is not None:
                epsilon = run.exp.privacy.epsilon(step)
                run.writer.write("privacy", step, {"epsilon": epsilon})
                spent = f" (epsilon {epsilon:.3g} spent)"
            if jax.process_index() == 0:
                print(f"step {step}: validation {c.best_metric} {metric_value(val, c.best_metric):.4f}{spent}",
                      flush=True)
            run.writer.reset_clock(step)
        if step % c.train.checkpoint_every == 0 or last:
            metric = {c.best_metric: metric_value(val, c.best_metric)} if val else None
            try:  # a non-finite state is never saved
                checkpoint.save(run.manager, step, run.strategy.host_state(run.state), data_position(c, step),
                                metric, force=last)
            except checkpoint.NonFiniteState:
                _fetch(pending, run.manager)  # names the first step whose loss went non-finite, if one did
                raise
    run.manager.wait_until_finished()
    return {"step": step, "validation": validation, "wall_seconds": time.perf_counter() - start,
            "data_wait": data_wait, "first_step_s": first_step_s,
            "first_step_compiles": (first_step_compiles or 0) - (compiles_before or 0)}


def finish(run: Run, loop: dict) -> dict:
    """The final validation and test evaluation (of the best checkpoint by validation, or the last),
    `results.json`, `eval/<split>.json` with intervals, and the console tables."""
    c, exp, step = run.exp.config, run.exp, loop["step"]
    final = c.train.get("final_checkpoint", "best")
    if final not in ("best", "last"):
        raise ValueError(f"train.final_checkpoint={final!r}: use 'best' or 'last'")
    evaluated_step, collected, results = step, {}, {}
    if loop["validation"] and loop["validation"][0] == step:  # the last step's validation is this state's
        results["validation"], collected["validation"] = loop["validation"][1:]
    best = run.manager.best_step() if final == "best" and run.validate else None
    if best not in (None, step):
        try:
            run.state = run.strategy.restore(run.manager, run.state, best)[0]
        except Exception as e:  # noqa: BLE001  (an unreadable best checkpoint: the last step is in memory)
            if jax.process_count() > 1:
                raise
            checkpoint.collect_failed_read()
            print(f"Warning: the best checkpoint by validation, step {best}, cannot be read "
                  f"({checkpoint.first_line(e)}): the final evaluation uses the last step, {step}", flush=True)
        else:
            evaluated_step = best
            results.pop("validation", None)
            if jax.process_index() == 0:
                print(f"Final evaluation with the best checkpoint by validation {c.best_metric}: step "
                      f"{evaluated_step} of {step}", flush=True)
    if run.validate and "validation" not in results:
        results["validation"], collected["validation"] = _metrics_on(run, "validation")
    if "test" in exp.splits:
        results["test"], collected["test"] = _metrics_on(run, "test")
    n_proc = jax.process_count()
    run_info = {
        "steps_run": step - run.start_step, "evaluated_step": int(evaluated_step), "parameters": run.n_params,
        "train_rows": len(exp.train_rows) if exp.train_rows is not None else int(exp.spec.split_sizes["train"]),
        "devices": jax.device_count(), "processes": n_proc,
        "parallel": c.parallel, "sharding": c.get("sharding", "replicated"), "state_bytes_per_device": run.state_bytes,
        "recipe": exp.recipe, "accum_steps": c.train.get("accum_steps", 1),
        "wall_seconds": round(loop["wall_seconds"], 2),
        "first_step_seconds_incl_compile": round(loop["first_step_s"] or 0.0, 3),
        "compilations_in_first_step": loop["first_step_compiles"],
        "train_step_recompilations_after_first_step": _cache_size(run.train_step) - 1,
        "data_wait_fraction": round(loop["data_wait"] / max(loop["wall_seconds"], 1e-9), 4),
    }
    if exp.privacy is not None:  # what the whole run spent (the evaluated checkpoint's steps spent less)
        run_info["privacy"] = exp.privacy.summary(step)
    if "test" in results:
        run.writer.write("test", evaluated_step, results["test"])
    run.writer.write("run", step, run_info)
    versus = None
    if jax.process_index() == 0:
        recs = {}
        for split in results:  # eval/<split>.json: the metrics with bootstrap intervals, and the predictions
            recs[split] = records.write(run.workdir, split, collected[split], exp.tasks, evaluated_step, c,
                                        reference=collected.get("validation") if split != "validation" else None)
        if "test" in results and baselines.enabled(c):
            versus = _baselines(exp, evaluated_step, collected, recs["test"])
        # results.json marks a finished run (the sweep and the cross-validation read it back): written whole
        # or not at all
        partial = exp.path(RESULTS_FILE + ".partial")
        with open(partial, "w") as f:
            json.dump({**results, "run": run_info, **({"baselines": versus} if versus else {})}, f, indent=2)
        os.replace(partial, exp.path(RESULTS_FILE))
        print(task_metrics.format_table(results, exp.tasks), flush=True)
        if "test" in results:
            print(format_intervals(recs["test"], exp.tasks), flush=True)
            if versus:
                print(f"Classical baselines (eval/test_baselines.json):\n{versus['verdict']}", flush=True)
            if run.writer.active and c.train.get("figures", True):
                from mmjax.evaluation import figures  # matplotlib, only when figures are drawn

                try:  # ROC curves, reliability diagrams, confusion matrices as TensorBoard images
                    run.writer.images(evaluated_step, figures.main_figures(collected["test"], recs["test"], exp.tasks))
                except Exception as e:  # noqa: BLE001  (a figure must not lose the run's results)
                    logging.warning("TensorBoard figures not written: %s: %s", type(e).__name__, e)
    return {**results, "run": run_info, **({"baselines": versus} if versus else {})}


def _baselines(exp, step: int, collected: dict, record: dict) -> dict | None:
    """The classical baselines on the test split beside the model (`mmjax/evaluation/baselines.py`): what
    results.json keeps of them, or None (a failure is a warning: it must not lose the run's results)."""
    out = baselines.compare_or_warn(exp, "test", step, collected["test"], record)
    if out is None:
        return None
    best = out["baselines"][out["best"]]["test"]
    return {"metric": out["metric"], "best": out["best"], "best_test": best["metrics"],
            "best_test_ci": best.get("ci"), "comparison": out["comparison"]["metrics"].get(out["metric"]),
            "verdict": out["verdict"], "file": "eval/test_baselines.json"}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming it if it was started) and evaluates it; returns
    {'validation', 'test', 'run'}, or {'stopped_at_step': N} when `train.stop_at_step` stopped it."""
    compile_counter()
    run = init_or_restore(config, workdir)
    try:
        with _sigterm_as_exit():
            loop = fit(run)
            if loop["step"] < config.train.num_steps:  # stopped early on purpose (train.stop_at_step)
                return {"stopped_at_step": loop["step"]}
            return finish(run, loop)
    finally:  # an error or a SIGTERM: the checkpoint being written is finished, not left half-written
        run.writer.close()
        run.manager.close()


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM (a scheduler's preemption, `kill`) as SystemExit(143) inside the block, so that the
    `finally` above commits the asynchronous save in flight; the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _cache_size(fn) -> int:
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else 1
