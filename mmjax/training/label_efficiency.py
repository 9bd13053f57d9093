r"""A label-efficiency table: from scratch against pretrained encoders, at fractions of the training labels.

    python -m mmjax.training.label_efficiency --config=experiments/pneumoniamnist.py \
        --workdir=workdirs/le_pneumonia --fractions=0.01,0.1,1 --seeds=0,1,2

First `--mode=pretrain` on every training row of the experiment (`WORKDIR/pretrain`, labels unused;
`--config.pretrain.*` sets it), then for each fraction f and seed s two supervised runs on the same
seeded f of the training rows (`data.label_fraction=f`, `data.label_seed=s`, `seed=s`): from scratch
(`WORKDIR/f<f>/seed<s>/scratch`) and warm-started from the pretrained encoders (`.../pretrained`).
The classical baselines of each run fit on the same rows, so the table has them beside. Every run
has the model of the whole training split (`config.recipe='auto'` resolved once: a small fraction would
otherwise get the small-data recipe's encoders, which the pretrained ones are not). Like the
sweep, a finished run is read back (only for the config that made it) and an unfinished one resumes.

Writes `WORKDIR/label_efficiency.csv` (one row per run) and `label_efficiency.md` (per fraction: the
test metric's mean and standard deviation over seeds for each arm and the best baseline, and the
pretrained - scratch difference per seed) and prints the table.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import time

import ml_collections
from absl import app, flags

from mmjax import console
from mmjax.config import metric_value, parse_list
from mmjax.console import log_to_workdir
from mmjax.training import pretrain as pretraining
from mmjax.training.sweep import check_same_config, compilation_cache, quietly, run_one

ARMS = ("scratch", "pretrained")


def pretrain_once(config, workdir: str) -> dict:
    """`WORKDIR/pretrain`'s record: read back when it finished for this config, else pretrained (resumed) now."""
    check_same_config(config, workdir)
    done = os.path.join(workdir, pretraining.PRETRAIN_FILE)
    if os.path.exists(done):
        with open(done) as f:
            record = json.load(f)
        now = pretraining.settings(config)
        if all(record["settings"].get(k) == v for k, v in now.items() if k not in ("log_every", "checkpoint_every")):
            return record
    return pretraining.pretrain(config, workdir)  # other settings than the finished one's: refused there


def check_same_pretraining(config, run_dir: str) -> None:
    """A pretrained arm's run is read back only when its encoders came from this pretraining's settings
    (`pretrain.*` is no part of the supervised run's own config comparison)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = pretraining.settings(ml_collections.ConfigDict(json.load(f)))
    now = pretraining.settings(config)
    differ = [k for k in now if k not in ("log_every", "checkpoint_every") and before.get(k) != now[k]]
    if differ:
        raise ValueError(f"{run_dir} was warm-started from a pretraining with other settings ({differ}); use "
                         "another workdir or remove it")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def run(config, workdir: str, fractions: list[float], seeds: list[int], metric: str) -> list[dict]:
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    if config.get("recipe", "standard") == "auto":  # one model for every arm: the recipe of all training rows
        from mmjax.experiment import Experiment

        config = copy.deepcopy(config)
        with config.unlocked():
            config.recipe = Experiment.from_config(config).recipe["name"]
        print(f"recipe={config.recipe} (what 'auto' gives the whole training split) for the pretraining and every "
              "run, so that every arm trains the same model", flush=True)
    with compilation_cache(workdir):
        pre_dir = os.path.join(workdir, "pretrain")
        quietly(pretrain_once, config, pre_dir, "==== pretraining the encoders on every training row")
        rows = []
        for fraction in fractions:
            for seed in seeds:
                for arm in ARMS:
                    c = copy.deepcopy(config)
                    with c.unlocked():
                        c.seed = seed
                        c.data.label_fraction = fraction
                        c.data.label_seed = seed
                        c.init_from = pre_dir if arm == "pretrained" else ""
                        c.init_params = ""
                    run_dir = os.path.join(workdir, f"f{fraction:g}", f"seed{seed}", arm)
                    if arm == "pretrained":
                        check_same_pretraining(c, run_dir)
                    results = quietly(run_one, c, run_dir, f"==== {arm}, {fraction:g} of the training labels, seed "
                                      f"{seed} ({time.perf_counter() - start:.0f} s so far)")
                    base = results.get("baselines") or {}
                    row = {"fraction": fraction, "seed": seed, "arm": arm,
                           "train_rows": results["run"].get("train_rows"),
                           "test": metric_value(results["test"], metric),
                           "baseline": metric_value(base["best_test"], metric) if base else float("nan"),
                           "baseline_name": base.get("best", ""), "wall_s": results["run"]["wall_seconds"]}
                    rows.append(row)
                    print(f"     test {metric} {row['test']:.4f} (best baseline {row['baseline']:.4f})", flush=True)
                write_tables(rows, workdir, metric)
    table = markdown(rows, metric)
    print(table, flush=True)
    print(f"label efficiency took {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per fraction: each arm's and the baseline's mean and sd over seeds, and pretrained - scratch per seed."""
    out = []
    for fraction in dict.fromkeys(r["fraction"] for r in rows):
        here = [r for r in rows if r["fraction"] == fraction]
        by = {arm: {r["seed"]: r["test"] for r in here if r["arm"] == arm} for arm in ARMS}
        paired = [by["pretrained"][s] - by["scratch"][s] for s in by["scratch"] if s in by["pretrained"]]
        out.append({"fraction": fraction, "train_rows": here[0]["train_rows"],
                    **{arm: _mean_sd(list(by[arm].values())) for arm in ARMS},
                    "baseline": _mean_sd([r["baseline"] for r in here if r["arm"] == "scratch"]),
                    "gain": _mean_sd(paired), "gains": paired, "seeds": len(by["scratch"])})
    return out


def markdown(rows: list[dict], metric: str) -> str:
    lines = [f"| labelled fraction | training rows | scratch: test {metric} | pretrained | gain (pretrained - "
             "scratch), per seed | best classical baseline |", "|" + "---|" * 6]

    def fmt(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    for s in summary(rows):
        lines.append(f"| {s['fraction']:g} | {s['train_rows'] or ''} | {fmt(s['scratch'])} | {fmt(s['pretrained'])} | "
                     f"{s['gain'][0]:+.3f} ({' '.join(f'{g:+.3f}' for g in s['gains'])}) | {fmt(s['baseline'])} |")
    return "\n".join(lines) + f"\n\nmean ± sd over {summary(rows)[0]['seeds'] if rows else 0} seeds\n"


def write_tables(rows: list[dict], workdir: str, metric: str) -> None:
    with open(os.path.join(workdir, "label_efficiency.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(workdir, "label_efficiency.md"), "w") as f:
        f.write(markdown(rows, metric))


def main():
    config = console.define_config_flag("config", None, "An experiment config (experiments/pneumoniamnist.py).")
    workdir = flags.DEFINE_string("workdir", "workdirs/label_efficiency", "Where the runs and the tables go.")
    fractions = flags.DEFINE_string("fractions", "0.01,0.1,1", "Comma-separated fractions of the training labels.")
    seeds = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (the model's and the labelled rows').")
    metric = flags.DEFINE_string("metric", "macro_auroc", "The test metric of the table.")
    flags.mark_flag_as_required("config")

    def go(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        log_to_workdir(workdir.value)
        run(config.value, workdir.value, [float(v) for v in parse_list(fractions.value)],
            [int(v) for v in parse_list(seeds.value)], metric.value)

    console.run(go)


if __name__ == "__main__":
    main()
