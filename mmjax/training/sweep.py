r"""A sweep: every fusion x seeds of one experiment, ranked in one table.

    python -m mmjax.training.sweep --config=experiments/fusion_sweep.py --workdir=workdirs/sweep
    python -m mmjax.training.sweep --config=experiments/fusion_sweep.py:dataset=iu_xray --workdir=workdirs/sweep_iu \
        --config.model.width=128 --config.model.fusion.depth=3

The config is an ordinary experiment config plus a `sweep` block: `fusions` (comma-separated;
empty: every registered fusion), `seeds` ('0,1,2'), `metric` (the test metric ranked, a path such
as `macro_auroc` or `answer.accuracy`), `benchmark_steps` (timed train steps per fusion). Each
(fusion, seed) trains in `WORKDIR/<fusion>/seed<s>` with `train_and_evaluate`, so an interrupted
sweep resumes: a finished run (its `results.json`) is read back, an unfinished one resumes from its
checkpoint; a run whose `config.json` differs from the sweep's config for it is an error (a stale
result never enters the table). Per fusion it also measures, on the first seed's config: parameters, forward GFLOPs per
example (XLA's cost analysis of the evaluation forward pass), the train step in ms (compiled step on
one batch, the mean of `benchmark_steps`) and its compile time in s, kept in
`WORKDIR/<fusion>/costs.json`.

Writes `WORKDIR/sweep.csv` (one row per fusion, per-seed values too), `WORKDIR/sweep.md` (the
Markdown table, best first) and prints the table. Each run's console goes to its
`WORKDIR/<fusion>/seed<s>/console.log`; the sweep's shows two lines per run and the table.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import statistics
import time

import jax
from absl import app, flags

from mmjax import console
from mmjax.benchmarks import train_step as step_benchmark
from mmjax.config import NO_RESULT_DEPENDS, config_differences, lower_is_better, metric_value, parse_list
from mmjax.console import log_to_workdir
from mmjax.experiment import RESOLVED, resolved_differences
from mmjax.models.fusion import FUSIONS
from mmjax.training.train import train_and_evaluate


def forward_gflops(setup) -> float:
    """GFLOPs per example of the evaluation forward pass, from XLA's cost analysis of an unsharded
    (one-device) compilation: a sharded one reports one device's share."""
    (params, batch), model = jax.device_get((setup.state.params, setup.batch)), setup.model
    lowered = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False)[0]).lower(params, batch)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan"))) / len(batch["example_mask"]) / 1e9


def measure_costs(config, steps: int) -> dict:
    """Parameters, GFLOPs per example, train step ms and compile s of one config."""
    setup = step_benchmark.setup(config)
    gflops = forward_gflops(setup)  # before the benchmark: its steps donate the state
    bench = step_benchmark.benchmark(config, steps, setup, loop_warmup=0)  # the loop's figures are not used
    return {"parameters": bench["parameters"], "gflops_per_example": gflops,
            "train_step_ms": bench["step_ms"], "compile_s": bench["compile_s"]}


def check_same_config(config, workdir: str) -> None:
    """Raises when `workdir` holds a run of another config (`NO_RESULT_DEPENDS` and the sweep block aside):
    a finished run is read back only for the config that made it (the sweep's runs, the cross-validation's
    folds)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)
    now = json.loads(config.to_json_best_effort())
    # the sweep block says which runs to make, not how to make one (a narrower sweep reuses them), and
    # NO_RESULT_DEPENDS on the others (a run made before one existed, or with another value, counts)
    differ = config_differences(before, now, NO_RESULT_DEPENDS | {"sweep."} | RESOLVED)
    differ += resolved_differences(before, config, workdir)
    if differ:
        raise ValueError(f"{workdir} holds a run of another config (differs in {differ[:6]}); "
                         f"use another sweep workdir or remove that run")


def run_one(config, workdir: str) -> dict:
    """The run's results: read back when it finished before, else trained (or resumed) now."""
    check_same_config(config, workdir)
    done = os.path.join(workdir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    return train_and_evaluate(config, workdir)


def quietly(run, config, run_dir: str, header: str) -> dict:
    """`run(config, run_dir)` with its console (progress, validation, the results tables) in
    `run_dir/console.log`: the sweep's own console shows one header and one result line per run."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "console.log")
    print(f"{header}; its console: {log_path}", flush=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        return run(config, run_dir)


def cached_costs(config, workdir: str, steps: int) -> dict:
    path = os.path.join(workdir, "costs.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    costs = measure_costs(config, steps)
    with open(path, "w") as f:
        json.dump(costs, f)
    return costs


def summarize(rows: list[dict], metric: str) -> list[dict]:
    """Best first (the highest mean, or the lowest for an error metric); rows with no finite metric last."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    return sorted(rows, key=lambda r: sign * r["mean"] if r["mean"] == r["mean"] else float("inf"))


def markdown(rows: list[dict], metric: str) -> str:
    head = (f"| fusion | test {metric} (mean ± std) | per seed | parameters | GFLOPs / example | "
            "train step ms | compile s | train wall s / run |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['fusion']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                     f"{' '.join(f'{v:.3f}' for v in r['values'])} | {r['parameters']:,} | "
                     f"{r['gflops_per_example']:.4f} | {r['train_step_ms']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['train_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def compilation_cache(workdir: str):
    """The seeds of a fusion compile the same programs (a seed changes values, not shapes): unless a
    persistent compilation cache is set already (`JAX_COMPILATION_CACHE_DIR`), JAX's goes to
    `WORKDIR/jax_cache` while inside, so that every seed after the first, and a resumed sweep, reads
    them back (the results are bit-identical). The compile s of the table is timed with the cache off
    (`benchmark.compilation_cache_off`)."""
    if jax.config.jax_compilation_cache_dir:
        return contextlib.nullcontext()
    return step_benchmark.compilation_cache_setting("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


def sweep(config, workdir: str) -> list[dict]:
    s = config.sweep
    fusions = parse_list(s.fusions, FUSIONS.names(), "fusion") or tuple(FUSIONS.names())
    seeds = [int(v) for v in parse_list(s.seeds)]
    if not seeds:
        raise ValueError("sweep.seeds is empty")
    os.makedirs(workdir, exist_ok=True)
    with compilation_cache(workdir):
        return _sweep(config, workdir, fusions, seeds)


def _sweep(config, workdir: str, fusions, seeds) -> list[dict]:
    s = config.sweep
    rows, start = [], time.perf_counter()
    for fusion in fusions:
        values, walls = [], []
        for seed in seeds:
            c = copy.deepcopy(config)
            with c.unlocked():
                c.model.fusion.name = fusion
                c.seed = seed
            run_dir = os.path.join(workdir, fusion, f"seed{seed}")
            results = quietly(run_one, c, run_dir,
                              f"==== sweep: {fusion}, seed {seed} ({time.perf_counter() - start:.0f} s so far)")
            values.append(metric_value(results["test"], s.metric))
            walls.append(results["run"]["wall_seconds"])
            print(f"     test {s.metric} {values[-1]:.4f}, trained in {walls[-1]:.0f} s", flush=True)
        c = copy.deepcopy(config)
        with c.unlocked():
            c.model.fusion.name = fusion
        costs = cached_costs(c, os.path.join(workdir, fusion), int(s.benchmark_steps))
        rows.append({"fusion": fusion, "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values,
                     "train_wall_s": statistics.fmean(walls), **costs})
        write_tables(summarize(rows, s.metric), workdir, s.metric)  # after every fusion: a partial table survives
    rows = summarize(rows, s.metric)
    print(markdown(rows, s.metric), flush=True)
    print(f"sweep took {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def write_tables(rows: list[dict], workdir: str, metric: str) -> None:
    with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fusion", f"{metric}_mean", f"{metric}_std", "per_seed", "parameters", "gflops_per_example",
                    "train_step_ms", "compile_s", "train_wall_s"])
        for r in rows:
            w.writerow([r["fusion"], f"{r['mean']:.4f}", f"{r['std']:.4f}", " ".join(f"{v:.4f}" for v in r["values"]),
                        r["parameters"], f"{r['gflops_per_example']:.5f}", r["train_step_ms"], r["compile_s"],
                        f"{r['train_wall_s']:.1f}"])
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(markdown(rows, metric))


def main():
    # Flags defined here, not at import, so that tests and other entry points can import this module.
    config = console.define_config_flag("config", None, "Sweep config (experiments/fusion_sweep.py).")
    workdir = flags.DEFINE_string("workdir", "workdirs/sweep", "Where each run and the tables go.")
    flags.mark_flag_as_required("config")

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        log_to_workdir(workdir.value)
        sweep(config.value, workdir.value)

    console.run(run)


if __name__ == "__main__":
    main()
