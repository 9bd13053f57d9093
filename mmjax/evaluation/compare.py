r"""Compares two trained runs on the same rows: `python -m mmjax.evaluation.compare W1 W2 [--split=test]`.

For every metric: W1 - W2, its paired patient-level bootstrap interval and p-value (both runs
scored on the same resamples), and for every AUROC DeLong's test (`mmjax.metrics.delong`).
Each workdir needs `eval/<split>_predictions.npz` (written at the end of training, or by
`python launch.py --workdir=W --mode=evaluate`); the two must hold the same rows (patients and
labels, in order), i.e. the same split of the same dataset. `--out=FILE` also writes the table as
JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mmjax.evaluation.records import load_predictions
from mmjax.experiment import Experiment
from mmjax.metrics import bootstrap
from mmjax.metrics import tasks as task_metrics
from mmjax.metrics.delong import delong_test


def _tasks(workdir: str):
    return Experiment.from_workdir(workdir).tasks


def compare(workdir_a: str, workdir_b: str, split: str = "test", resamples: int = bootstrap.DEFAULT_RESAMPLES,
            seed: int = 0, level: float = 0.95) -> dict:
    """{'metrics': {path: paired difference}, 'delong': {auroc path: DeLong's test}, 'rows', ...}."""
    tasks = _tasks(workdir_a)
    names_b = [t.name for t in _tasks(workdir_b)]
    if [t.name for t in tasks] != names_b:
        raise ValueError(f"the runs have different tasks: {[t.name for t in tasks]} vs {names_b}")
    pa, la, ma, ids = load_predictions(workdir_a, split, tasks)
    pb, lb, mb, ids_b = load_predictions(workdir_b, split, tasks)
    if len(ids) != len(ids_b) or np.any(ids != ids_b):
        raise ValueError(f"{workdir_a} and {workdir_b} scored different rows of {split!r} ({len(ids)} vs "
                         f"{len(ids_b)} rows, or another order): compare runs on the same split of the same data")
    for t in tasks:
        known = ma[t.name]
        if not (np.array_equal(known, mb[t.name]) and np.array_equal(la[t.name][known], lb[t.name][known])):
            raise ValueError(f"task {t.name!r}: the two runs' labels differ on the same rows")
    paired = compare_predictions(pa, pb, la, ma, ids, tasks, resamples, seed, level)
    return {"a": os.path.abspath(workdir_a), "b": os.path.abspath(workdir_b), "split": split, "rows": int(len(ids)),
            "patients": int(len(np.unique(ids))),
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "unit": "patient"},
            **paired}


def compare_predictions(pa: dict, pb: dict, labels: dict, masks: dict, ids, tasks,
                        resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """{'metrics': {path: {'a', 'b', 'difference', 'low', 'high', 'p_value'}}, 'delong': {auroc path: test}}
    of predictions `pa` against `pb` of the same rows (labels, masks and patient ids `ids`), paired on the
    same patient-level resamples."""
    la, ma = labels, masks  # the same rows and labels for both
    point_a = task_metrics.compute_metrics(pa, la, ma, tasks)
    point_b = task_metrics.compute_metrics(pb, la, ma, tasks)
    flat_b = dict(task_metrics.flat_metrics(point_b))
    if resamples > 0:
        boot = bootstrap.resample(lambda w: {"a": task_metrics.compute_metrics(pa, la, ma, tasks, sample_weight=w),
                                             "b": task_metrics.compute_metrics(pb, la, ma, tasks, sample_weight=w)},
                                  ids, resamples, seed)
        boot_a, boot_b = (dict(task_metrics.flat_metrics(t)) for t in (boot["a"], boot["b"]))
    out = {}
    for path, value_a in task_metrics.flat_metrics(point_a):
        value_b = flat_b[path]
        diff = (bootstrap.paired_difference(boot_a[path], boot_b[path], float(value_a - value_b), level)
                if resamples > 0 else {"difference": float(value_a - value_b), "p_value": float("nan")})  # no resamples
        out[path] = {"a": float(value_a), "b": float(value_b), **diff}
    delong = {}
    for t in tasks:
        if t.kind == "binary":
            outputs = [((t.name, "auroc"), la[t.name], pa[t.name], pb[t.name], ma[t.name])]
        elif t.kind == "multilabel":
            outputs = [((t.name, "labels", name, "auroc"), la[t.name][:, k], pa[t.name][:, k], pb[t.name][:, k],
                        ma[t.name][:, k]) for k, name in enumerate(t.label_names)]
        else:
            continue
        for path, y, a, b, known in outputs:
            try:
                delong[".".join(path)] = delong_test(y[known], a[known], b[known])
            except ValueError as e:  # too few positives or negatives
                delong[".".join(path)] = {"error": str(e)}
    return {"metrics": out, "delong": delong}


def format_comparison(result: dict) -> str:
    level = result["bootstrap"]["level"]
    rows = [("metric", "A", "B", "A - B", f"{level:.0%} CI (bootstrap)", "p (bootstrap)", "p (DeLong)")]
    for path, m in result["metrics"].items():
        d = result["delong"].get(path, {})
        rows.append((path, f"{m['a']:.4f}", f"{m['b']:.4f}", f"{m['difference']:+.4f}",
                     f"[{m.get('low', float('nan')):+.4f}, {m.get('high', float('nan')):+.4f}]", f"{m['p_value']:.3f}",
                     f"{d['p_value']:.3f}" if "p_value" in d else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    note = ("\nNote: patients have several rows; DeLong's test treats rows as independent (its p-values run "
            "low), the bootstrap resamples patients" if result["patients"] < result["rows"] else "")
    return (f"A = {result['a']}\nB = {result['b']}\n{result['split']} split: {result['rows']} rows, "
            f"{result['patients']} patients, {result['bootstrap']['resamples']} paired resamples\n" + "\n".join(lines)
            + note)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmjax.evaluation.compare", description=__doc__.split("\n")[0])
    parser.add_argument("workdir_a")
    parser.add_argument("workdir_b")
    parser.add_argument("--split", default="test")
    parser.add_argument("--resamples", type=int, default=bootstrap.DEFAULT_RESAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--out", default="", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    result = compare(args.workdir_a, args.workdir_b, args.split, args.resamples, args.seed, args.level)
    print(format_comparison(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
