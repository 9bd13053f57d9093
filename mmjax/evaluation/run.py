"""Evaluation of a trained workdir: metrics with patient-level bootstrap intervals, written to
`W/eval/<split>.json`, and the predictions behind them in `W/eval/<split>_predictions.npz` (what
`python -m mmjax.evaluation.compare` pairs).

    python launch.py --workdir=W --mode=evaluate [--split=test] [--step=N]

The run is rebuilt from `W/config.json` and `W/dataset_spec.json` (vocabularies, statistics, tasks:
saved at training time), with the best checkpoint by validation `best_metric` (or `--step`). The
rows come from the split of the dataset that `config.data` names. Training writes the same files
for validation and test at its end (`write`).

`config.eval`: `bootstrap_resamples` (default 1000; 0: no intervals), `bootstrap_seed`, `level`
(0.95), `calibration_bins` (10), `operating_point` ('youden' or 'sensitivity', with
`target_sensitivity`): see `mmjax/evaluation/calibration.py`. When the split is not validation,
temperatures and thresholds are fitted on validation and applied to it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np

from mmjax.data import pipeline
from mmjax.data.spec import DatasetSpec
from mmjax.evaluation import attribution, bootstrap, calibration, evaluate, robustness
from mmjax.training import checkpoint, parallel
from mmjax.training.step import make_eval_step


def eval_settings(config) -> dict:
    e = config.get("eval", None) or {}
    return {"resamples": int(e.get("bootstrap_resamples", bootstrap.DEFAULT_RESAMPLES)),
            "seed": int(e.get("bootstrap_seed", 0)), "level": float(e.get("level", 0.95)),
            "bins": int(e.get("calibration_bins", 10)), "rule": str(e.get("operating_point", "youden")),
            "target_sensitivity": float(e.get("target_sensitivity", 0.9))}


def record(collected, tasks, step: int, reference=None, resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = 0,
           level: float = 0.95, bins: int = 10, rule: str = "youden", target_sensitivity: float = 0.9) -> dict:
    """{'step', 'metrics', 'ci', 'bootstrap', 'calibration', 'operating_points', ...}: point metrics, their
    percentile intervals from `resamples` patient-level resamples (the rows' patient ids are the
    resampling unit), calibration and operating points with temperatures and thresholds fitted on
    `reference` (the validation split's collected predictions; None: on these rows)."""
    preds, labels, masks, ids = collected
    point = evaluate.compute_metrics(preds, labels, masks, tasks)
    out = {"step": int(step), "metrics": point,
           **calibration.summary(collected, tasks, reference, bins, rule, target_sensitivity)}
    if resamples > 0 and len(ids):
        boot = bootstrap.resample(lambda w: evaluate.compute_metrics(preds, labels, masks, tasks, sample_weight=w),
                                  ids, resamples, seed)
        out["ci"] = bootstrap.intervals(boot, level)
        out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": level, "unit": "patient",
                            "patients": int(len(np.unique(ids))), "rows": int(len(ids)),
                            "method": "percentile"}
    return out


def write(workdir: str, split: str, collected, tasks, step: int, config, reference=None) -> dict:
    """Writes `eval/<split>.json` (metrics, intervals, calibration, operating points; temperatures and
    thresholds fitted on `reference`, the validation split's predictions) and `eval/<split>_predictions.npz`."""
    rec = record(collected, tasks, step, reference, **eval_settings(config))
    rec["split"] = split
    folder = os.path.join(workdir, "eval")
    os.makedirs(folder, exist_ok=True)
    dump_json(rec, os.path.join(folder, f"{split}.json"))
    preds, labels, masks, ids = collected
    np.savez_compressed(os.path.join(folder, f"{split}_predictions.npz"), patient_id=np.asarray(ids, str),
                        **{f"pred/{k}": v for k, v in preds.items()}, **{f"label/{k}": v for k, v in labels.items()},
                        **{f"mask/{k}": v for k, v in masks.items()})
    return rec


def load_predictions(workdir: str, split: str, tasks) -> tuple:
    """(preds, labels, masks, ids) as `write` saved them."""
    path = os.path.join(workdir, "eval", f"{split}_predictions.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python launch.py --workdir={workdir} --mode=evaluate "
                                f"--split={split}` first")
    z = np.load(path)
    get = lambda kind: {t.name: z[f"{kind}/{t.name}"] for t in tasks}
    return get("pred"), get("label"), get("mask"), z["patient_id"]


SCHEMA_FILE = "schema.yaml"  # a manifest run's schema, copied into the workdir at training time (predict reads it)


def load_eval(workdir: str, name: str, step: int) -> dict | None:
    """`W/eval/<name>` (a JSON file `write` or `analyze` wrote) if it exists and is of checkpoint
    `step`, else None; null values (NaN when written) read back as NaN."""
    path = os.path.join(workdir, "eval", name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f, object_pairs_hook=lambda pairs: {k: float("nan") if v is None else v for k, v in pairs})
    return rec if rec.get("step") == step else None


def _plain(x):
    """JSON-ready: arrays as lists, NaN and infinities as null (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_plain(obj), f, indent=2, allow_nan=False)


@dataclasses.dataclass
class TrainedRun:
    """A workdir's model and parameters, rebuilt without its training loop."""

    workdir: str
    config: ml_collections.ConfigDict
    spec: DatasetSpec
    tasks: tuple
    modalities: tuple
    model: object
    params: object
    step: int
    chosen: str = ""  # how the step was chosen

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> TrainedRun:
        from mmjax.training.train import build_model, lower_is_better, parse_list

        workdir = os.path.abspath(workdir)
        if jax.process_count() > 1:
            raise NotImplementedError("evaluating a workdir runs in one process (on all its local devices); "
                                      f"this is process {jax.process_index()} of {jax.process_count()}")
        for name in ("config.json", "dataset_spec.json"):
            if not os.path.exists(os.path.join(workdir, name)):
                raise FileNotFoundError(f"{workdir} has no {name}: not a training workdir")
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        spec = DatasetSpec.load(os.path.join(workdir, "dataset_spec.json"))
        tasks = spec.select_tasks(parse_list(config.tasks))
        modalities = tuple(m.name for m in spec.select_modalities(parse_list(config.modalities)))
        model = build_model(config, spec, tasks)
        chosen = "--step"
        if step is None:
            step, chosen = checkpoint.best_step(workdir, config.best_metric, lower_is_better(config.best_metric))
        batch = _template_batch(config, spec, tasks, modalities)
        template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False)["params"])
        params, step = checkpoint.restore_params(workdir, template, step=step, label="evaluating the checkpoints of ")
        return cls(workdir, config, spec, tasks, modalities, model, params, int(step), chosen)

    @property
    def windows(self) -> int:
        """Evaluation windows per long signal (`data.signal_eval_windows`; 0: the centre crop)."""
        return int(self.config.data.get("signal_eval_windows", 0))

    def data_kwargs(self) -> dict:
        d = self.config.data
        return dict(modalities=self.modalities, tasks=self.tasks, text_max_length=d.text_max_length,
                    spectrogram=d.spectrogram)

    @functools.cached_property
    def _predict(self):
        """predict(host batch) -> host predictions: the model jitted once, batches sharded over devices."""
        windowed = tuple(m.name for m in self.spec.select_modalities(self.modalities) if m.kind == "signal") \
            if self.windows else ()
        mesh = parallel.make_mesh()
        data_sharding = parallel.batch_sharding(mesh)
        step = jax.jit(make_eval_step(self.model, self.tasks, windowed),
                       in_shardings=(parallel.replicated(mesh), data_sharding))
        params = jax.device_put(self.params, parallel.replicated(mesh))
        return lambda b: jax.tree.map(np.asarray, step(params, parallel.global_batch(b, data_sharding)))

    def collect(self, batches, batch_size: int, transform=None):
        """(preds, labels, masks, ids) over host batches (each through `transform` first, if given)."""
        if batch_size % jax.device_count():
            raise ValueError(f"batch size {batch_size} must be divisible by the {jax.device_count()} devices")
        predict = self._predict if transform is None else (lambda b: self._predict(transform(b)))
        return evaluate.collect(predict, batches, self.tasks, with_ids=True)

    def batches(self, split: str):
        builder = pipeline.builder_from_config(self.config.data)
        if split not in builder.info.splits:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(builder.info.splits)}")
        size = self.config.eval_batch_size
        return pipeline.eval_batches(builder, self.spec, split, size, signal_windows=self.windows,
                                     **self.data_kwargs()), builder

    def evaluate(self, split: str = "test") -> dict:
        batches, builder = self.batches(split)
        size = self.config.eval_batch_size
        collected = self.collect(batches, size)
        reference = None
        if split != "validation" and "validation" in builder.info.splits:  # thresholds and temperatures
            reference = self.collect(self.batches("validation")[0], size)
        return write(self.workdir, split, collected, self.tasks, self.step, self.config, reference)

    def analyze(self, split: str = "test", fractions=(0.0, 0.25, 0.5, 0.75, 1.0), sigmas=(0.1, 0.3, 1.0),
                seed: int = 0) -> dict:
        """Robustness (every subset of modalities, missing fractions, noise) and Shapley values over
        modalities (`mmjax/evaluation/robustness.py`); writes `eval/<split>_robustness.json` and the
        per-patient values to `eval/<split>_shapley.npz`."""
        size, names = self.config.eval_batch_size, tuple(self.modalities)
        os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
        cached = list(self.batches(split)[0])  # every pass below reuses these host batches
        kinds = {m.name: m.kind for m in self.spec.select_modalities(names)}
        metric = lambda c: evaluate.compute_metrics(*c[:3], self.tasks)
        exact = len(names) <= robustness.MAX_SHAPLEY_MODALITIES
        chosen = robustness.subsets(names) if exact else [()] + [(m,) for m in names] + [
            tuple(n for n in names if n != m) for m in names] + [names]  # > 6: alone and left out only
        by_subset = self.by_subset(cached, chosen)
        ids = by_subset[names][3]
        metrics = {s: metric(c) for s, c in by_subset.items()}
        flat = {s: dict(evaluate.flat_metrics(m)) for s, m in metrics.items()}
        real = [np.asarray(b["example_mask"], bool) for b in cached]
        count = {m: int(sum(np.asarray(b[m]["present"], bool)[r].sum() for b, r in zip(cached, real))) for m in names}
        out = {"split": split, "step": self.step, "modalities": list(names),
               "presence": {"patients": int(sum(r.sum() for r in real)), "present": count},
               "subsets": [{"present": list(s), "metrics": flat[s]} for s in by_subset],
               "leave_one_out": {m: {k: flat[names][k] - flat[tuple(n for n in names if n != m)][k]
                                     for k in flat[names]} for m in names}}
        keys = list(flat[names])
        game = {s: np.array([flat[s][k] for k in keys]) for s in by_subset}
        if exact:
            values = robustness.shapley(game, names)
            out["shapley_metrics"] = {m: dict(zip(keys, v.tolist())) for m, v in values.items()}
            phi, columns, game = self.patient_shapley(by_subset)  # [N, M, C]
            per_patient = {m: phi[:, j] for j, m in enumerate(names)}
            out["shapley"] = {"outputs": columns, "mean_abs": {m: dict(zip(columns, np.abs(per_patient[m]).mean(0)
                                                                               .tolist())) for m in names},
                              "mean": {m: dict(zip(columns, per_patient[m].mean(0).tolist())) for m in names}}
            np.savez_compressed(os.path.join(self.workdir, "eval", f"{split}_shapley.npz"), patient_id=ids.astype(str),
                                values=phi, modalities=np.array(names), outputs=np.array(columns),
                                full=game[names], empty=game[()])
        def score(transform) -> dict:
            return dict(evaluate.flat_metrics(metric(self.collect(cached, size, transform))))

        out["missing_fraction"] = {m: [{"fraction": f, "metrics": score(
            lambda b, m=m, f=f: robustness.hide(b, [m], robustness.patient_fraction(b["patient_id"], m) < f))}
            for f in fractions] for m in names}
        out["noise"] = {m: [{"sigma": sg, "metrics": score(
            lambda b, m=m, sg=sg, i=i: robustness.add_noise(b, m, sg, (seed, i)))} for sg in sigmas]
            for i, m in enumerate(names) if kinds[m] != "text"}
        dump_json(out, os.path.join(self.workdir, "eval", f"{split}_robustness.json"))
        return out


    def by_subset(self, batches, subsets) -> dict:
        """{present modalities: collected predictions} with the other modalities hidden, per subset."""
        names = set(self.modalities)
        return {s: self.collect(batches, self.config.eval_batch_size,
                                lambda b, s=s: robustness.hide(b, names - set(s))) for s in dict.fromkeys(subsets)}

    def patient_shapley(self, by_subset) -> tuple[np.ndarray, list[str], dict]:
        """(values [N, modalities, outputs], output names, game): exact Shapley values of every output
        (probabilities; a regression's value) per patient, from `by_subset` over every subset."""
        outputs, columns = _output_columns(self.tasks)
        game = {s: np.concatenate([_columns(c[0][t]) for t in outputs], 1) for s, c in by_subset.items()}
        values = robustness.shapley(game, tuple(self.modalities))  # {m: [N, C]}
        return np.stack([values[m] for m in self.modalities], 1), columns, game

    def explain(self, split: str = "test", count: int = 4, output: str = "", steps: int = 64,
                patients=()) -> dict:
        """Integrated gradients of one output (`task` or `task.label`; default: the first classification
        task's first label) for the first `count` patients of `split`, or for the rows of the patient ids
        `patients`, every modality's input at once (`mmjax/evaluation/attribution.py`), and the fusion's
        attention maps when it has them; written to `eval/<split>_attributions.npz`."""
        task, index, name = self._output(output)
        batch = pick_rows(self.batches(split)[0], count, patients, split)
        kinds = {m.name: m.kind for m in self.spec.select_modalities(self.modalities)}
        device = parallel.device_batch(batch)
        f = attribution.output_fn(self.model, self.tasks, task, index)
        a = attribution.integrated_gradients(self.model, self.params, device, f, kinds, steps)
        out = {"patient_id": np.asarray(batch["patient_id"]).astype(str), "output": np.array(name), "step": self.step,
               "f_input": a["_f_input"], "f_baseline": a["_f_baseline"], "completeness_gap":
               attribution.completeness_gap(a), "modalities": np.array(list(kinds)),
               "kinds": np.array([kinds[m] for m in kinds])}
        for m, kind in kinds.items():
            out[f"attribution/{m}"] = attribution.heatmap(a[m], kind)
            out[f"present/{m}"] = np.asarray(batch[m]["present"])
            if kind == "text":
                vocab = np.array(self.spec.modality(m).vocab)
                out[f"tokens/{m}"] = np.where(np.asarray(batch[m]["mask"]), vocab[np.asarray(batch[m]["values"])], "")
            else:
                out[f"input/{m}"] = np.asarray(batch[m]["values"])
        _, aux = self.model.apply({"params": self.params}, device, train=False)
        if "attention" in aux:  # [layers] of [B, heads, T, T] -> [B, layers, T, T], mean over heads
            out["attention"] = np.stack([np.asarray(w).mean(1) for w in aux["attention"]], 1)
            out["token_modality"] = np.asarray(aux["token_modality"])
        np.savez_compressed(os.path.join(self.workdir, "eval", f"{split}_attributions.npz"), **out)
        return out

    def _output(self, output: str) -> tuple[str, int | None, str]:
        """(task, index, name) of 'task' or 'task.label' (default: the first classification output)."""
        tasks = {t.name: t for t in self.tasks}
        if not output:
            t = next((t for t in self.tasks if t.kind != "regression"), self.tasks[0])
            output = t.name if t.kind in ("binary", "regression") else f"{t.name}.{t.label_names[0]}"
        task, _, label = output.partition(".")
        if task not in tasks:
            raise ValueError(f"explain output {output!r}: no task {task!r}; tasks are {sorted(tasks)}")
        t = tasks[task]
        if t.kind in ("binary", "regression"):
            return task, None, task
        if label not in t.label_names:
            raise ValueError(f"explain output {output!r}: task {task!r} has labels {list(t.label_names)}")
        return task, list(t.label_names).index(label), output


def pick_rows(batches, count: int, patients=(), split: str = "") -> dict:
    """One batch of the first `count` real rows of `batches`, or of every row of the patient ids
    `patients` (an error naming the ids not found)."""
    wanted = {str(p) for p in patients}
    picked, found, total = [], set(), 0
    for batch in batches:
        real = np.flatnonzero(np.asarray(batch["example_mask"], bool))
        ids = np.asarray(batch["patient_id"]).astype(str)
        rows = [r for r in real if ids[r] in wanted] if wanted else real[:count - total]
        found.update(ids[rows])
        if len(rows):
            picked.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[rows], batch))
            total += len(rows)
        if (found == wanted) if wanted else total >= count:
            break
    if wanted and found != wanted:
        raise ValueError(f"split {split!r} has no patient(s) {sorted(wanted - found)}")
    if not picked:
        raise ValueError(f"split {split!r} has no rows to explain")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *picked)


def _output_columns(tasks) -> tuple[list[str], list[str]]:
    """The tasks with per-patient outputs and a name per output column ('task' or 'task.label')."""
    columns = []
    for t in tasks:
        if t.kind in ("binary", "regression"):
            columns.append(t.name)
        else:
            columns += [f"{t.name}.{n}" for n in t.label_names]
    return [t.name for t in tasks], columns


def _columns(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


def _template_batch(config, spec, tasks, modalities) -> dict:
    """A one-row batch of the model's input shapes (random values) to trace its parameter shapes."""
    from mmjax.batch import fake_batch
    from mmjax.data.transforms import Spectrogram

    mods = spec.select_modalities(modalities)
    batch = fake_batch(mods, tasks, 1, text_length=config.data.text_max_length)
    if config.data.spectrogram:
        for m in mods:
            if m.kind == "signal":
                ex = Spectrogram(m.name).map({f"out/{m.name}": {k: v[0] for k, v in batch[m.name].items()}})
                batch[m.name] = {k: np.asarray(v)[None] for k, v in ex[f"out/{m.name}"].items()}
    return parallel.device_batch(batch)


def interval_rows(rec: dict, tasks) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, interval low, high) of the main metrics of every task (None: no interval)."""
    point, ci = rec["metrics"], rec.get("ci", {})
    rows = []

    def add(name, path):
        value, c = point, ci
        for key in path:
            value, c = value[key], (c or {}).get(key)
        value = float("nan") if value is None else value
        defined = c and c.get("low") is not None and c.get("high") is not None
        rows.append((name, value, *((c["low"], c["high"]) if defined else (None, None))))

    add("macro_auroc (all binary outputs)", ["macro_auroc"])
    for t in tasks:
        if t.kind == "multilabel":
            add(f"{t.name} macro_auroc", [t.name, "macro_auroc"])
            for label in t.label_names:
                add(f"  {label} auroc", [t.name, "labels", label, "auroc"])
        elif t.kind == "binary":
            for m in ("auroc", "auprc"):
                add(f"{t.name} {m}", [t.name, m])
        elif t.kind == "multiclass":
            for m in ("accuracy", "macro_auroc"):
                add(f"{t.name} {m}", [t.name, m])
        else:
            add(f"{t.name} mae", [t.name, "mae"])
    return rows


def format_intervals(rec: dict, tasks) -> str:
    """The metrics table with each value's interval: 'value [low, high]'."""
    rows = [(n, f"{v:.4f}" + (f"  [{lo:.4f}, {hi:.4f}]" if lo is not None else ""))
            for n, v, lo, hi in interval_rows(rec, tasks)]
    width = max(len(r[0]) for r in rows)
    level = rec.get("bootstrap", {}).get("level", 0.95)
    head = f"{'metric':<{width}}  value" + (f"  [{level:.0%} CI, patient bootstrap]" if rec.get("ci") else "")
    return "\n".join([head] + [f"{n:<{width}}  {c}" for n, c in rows])


def presence_rate(out: dict, modality: str) -> float:
    """The fraction of the split's patients with `modality` present (from `analyze`'s output)."""
    return out["presence"]["present"][modality] / max(out["presence"]["patients"], 1)


def format_robustness(out: dict, metric: str = "macro_auroc") -> str:
    """`metric` with each modality alone, left out, and its Shapley share; noise and missing curves."""
    names = out["modalities"]
    flat = {tuple(s["present"]): s["metrics"] for s in out["subsets"]}
    full = flat[tuple(names)][metric]
    lines = [f"{metric}: all modalities {full:.4f}, none {flat[()][metric]:.4f}",
             f"{'modality':<12} {'present':>8} {'alone':>8} {'left out':>9} {'Shapley':>8}  missing 0..100%  /  "
             "noise sigma"]
    for m in names:
        present = f"{presence_rate(out, m):>8.1%}" if "presence" in out else f"{'?':>8}"
        shap = out.get("shapley_metrics", {}).get(m, {}).get(metric, float("nan"))
        miss = " ".join(f"{x['metrics'][metric]:.3f}" for x in out["missing_fraction"][m])
        noise = " ".join(f"{x['sigma']:g}:{x['metrics'][metric]:.3f}" for x in out.get("noise", {}).get(m, []))
        left = flat[tuple(n for n in names if n != m)][metric]
        lines.append(f"{m:<12} {present} {flat[(m,)][metric]:>8.4f} {left:>9.4f} {shap:>8.4f}  {miss}  /  "
                     f"{noise or '-'}")
    return "\n".join(lines)
