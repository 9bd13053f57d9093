"""The fusion sweep's bookkeeping: finished runs are read back (resume), statistics and tables, and
the GFLOPs figure against a hand count. (Training itself is tested in test_training.py.)"""

import contextlib
import csv
import json
import statistics
import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from mmjax.training import sweep


def _config(fusions="concat,late", seeds="0,1,2"):
    c = ml_collections.ConfigDict(dict(seed=0, model=dict(fusion=dict(name="cross_attention")),
                                       sweep=dict(fusions=fusions, seeds=seeds, metric="dx.accuracy",
                                                  benchmark_steps=1)))
    return c


def test_sweep_reads_finished_runs_and_ranks_fusions(tmp_path, monkeypatch):
    values = {"concat": [0.70, 0.74, 0.72], "late": [0.80, 0.78, 0.82]}
    for fusion, vs in values.items():
        for seed, v in enumerate(vs):
            run = tmp_path / fusion / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps({"test": {"dx": {"accuracy": v}},
                                                          "run": {"wall_seconds": 10.0 + seed}}))
    trained = []
    monkeypatch.setattr(sweep, "train_and_evaluate", lambda c, w: trained.append(w))
    monkeypatch.setattr(sweep, "measure_costs", lambda c, steps: {
        "parameters": 1000 if c.model.fusion.name == "concat" else 900, "gflops_per_example": 0.5,
        "train_step_ms": 12.0, "compile_s": 3.0})
    rows = sweep.sweep(_config(), str(tmp_path))
    assert trained == []  # every run had finished: nothing retrained
    assert [r["fusion"] for r in rows] == ["late", "concat"]  # best mean first
    for r in rows:
        assert r["mean"] == statistics.fmean(values[r["fusion"]])
        assert r["std"] == statistics.stdev(values[r["fusion"]])
        assert r["train_wall_s"] == 11.0
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["fusion"] for t in table] == ["late", "concat"]
    assert table[0]["dx.accuracy_mean"] == "0.8000" and table[1]["parameters"] == "1000"
    md = (tmp_path / "sweep.md").read_text().splitlines()
    assert md[2].startswith("| late | 0.800 ± 0.020 | 0.800 0.780 0.820 | 900 |")


def test_error_metrics_rank_lowest_first():
    rows = [{"fusion": "a", "mean": 0.5}, {"fusion": "b", "mean": 0.3}, {"fusion": "c", "mean": float("nan")}]
    assert [r["fusion"] for r in sweep.summarize(rows, "los.mae")] == ["b", "a", "c"]
    assert [r["fusion"] for r in sweep.summarize(rows, "macro_auroc")] == ["a", "b", "c"]


def test_a_finished_run_of_another_config_is_an_error(tmp_path):
    run = tmp_path / "concat" / "seed0"
    run.mkdir(parents=True)
    c = _config(fusions="concat", seeds="0")
    stale = json.loads(c.to_json_best_effort())
    stale["model"]["fusion"]["name"] = "concat"
    stale["model"]["width"] = 999
    (run / "config.json").write_text(json.dumps(stale))
    (run / "results.json").write_text(json.dumps({"test": {"dx": {"accuracy": 1.0}}, "run": {"wall_seconds": 1}}))
    with pytest.raises(ValueError, match="another config.*model.width"):
        sweep.sweep(c, str(tmp_path))
    # the sweep block only chooses runs: a run made by a wider sweep is read back by a narrower one
    del stale["model"]["width"]
    stale["model"]["fusion"]["name"] = c.model.fusion.name  # as sweep() sets it for the run
    stale["sweep"]["fusions"] = "concat,late,mean"
    (run / "config.json").write_text(json.dumps(stale))
    sweep.check_same_config(c, str(run))
    # a setting that changes no result (`train.figures`, added since): a saved config without it, or with
    # another value, is still this config, so the run is read back
    c.train = ml_collections.ConfigDict(dict(figures=True))
    sweep.check_same_config(c, str(run))
    stale["train"] = {"figures": False}
    (run / "config.json").write_text(json.dumps(stale))
    sweep.check_same_config(c, str(run))
    stale["train"]["num_steps"] = 7  # beside it, one that does is still another config
    (run / "config.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"another config.*\['train.num_steps'\]"):
        sweep.check_same_config(c, str(run))
    # settings added later: the input pipeline's (no result depends on them) and `model.remat`, whose
    # absence from a saved config means what it says when '' (off), and only that
    del stale["train"]["num_steps"]
    (run / "config.json").write_text(json.dumps(stale))
    c.data = ml_collections.ConfigDict(dict(cache_mib=16, device_prefetch=3))
    c.model.remat = ""
    sweep.check_same_config(c, str(run))
    c.model.remat = "fusion"
    with pytest.raises(ValueError, match=r"another config.*\['model.remat'\]"):
        sweep.check_same_config(c, str(run))


def test_sweep_rejects_an_unknown_fusion(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        sweep.sweep(_config(fusions="concat,nope"), str(tmp_path))


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, batch, train=False):
        return {"y": nn.Dense(8, use_bias=False)(batch["x"])}, {}


def test_forward_gflops_counts_a_matmul():
    model = _Linear()
    batch = {"x": np.ones((4, 16), np.float32), "example_mask": np.ones(4, bool)}
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    setup = types.SimpleNamespace(model=model, batch=batch, state=types.SimpleNamespace(params=params))
    assert abs(sweep.forward_gflops(setup) - 2 * 16 * 8 / 1e9) < 0.1 * 2 * 16 * 8 / 1e9


def test_compile_time_is_timed_with_the_persistent_cache_off(tmp_path):
    """The sweep turns JAX's persistent compilation cache on (later seeds read the first seed's
    programs); the compile s it reports must still be a compilation, not a read of the cache."""
    from mmjax.benchmarks.train_step import compilation_cache_off

    hits = []

    def listen(name, **kw):
        if name == "/jax/compilation_cache/cache_hits":
            hits.append(name)

    jax.monitoring.register_event_listener(listen)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    x = np.arange(7.0, dtype=np.float32)

    def compile_once():  # a fresh jit each time: nothing from JAX's in-memory caches
        n = len(hits)
        jax.jit(lambda v: v * 3.0 + 1.0).lower(x).compile()
        return len(hits) - n

    try:
        jax.config.update("jax_compilation_cache_dir", None)  # as outside the tests: no cache set
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        with sweep.compilation_cache(str(tmp_path)):  # the sweep's own, in its workdir
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
            compile_once()  # compiled and stored
            assert compile_once() == 1  # read back from the cache
            with compilation_cache_off():
                assert compile_once() == 0  # compiled
            assert compile_once() == 1  # the cache is on again after it
            with pytest.raises(RuntimeError), compilation_cache_off():
                raise RuntimeError("a failed compilation")
            assert compile_once() == 1  # and after an error inside it
        assert jax.config.jax_compilation_cache_dir is None  # the sweep leaves no cache set behind
        assert compile_once() == 0
    finally:
        jax.monitoring.unregister_event_listener(listen)
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()


def test_the_benchmark_compiles_with_the_cache_off(monkeypatch):
    from mmjax.benchmarks import train_step as step_benchmark

    inside, compiled_inside = [False], []

    @contextlib.contextmanager
    def off():
        inside[0] = True
        yield
        inside[0] = False

    class Lowered:
        def compile(self):
            compiled_inside.append(inside[0])
            return lambda state, batch: (state, {"loss": np.float32(0.0)})

    monkeypatch.setattr(step_benchmark, "compilation_cache_off", off)
    monkeypatch.setattr(step_benchmark.parallel, "global_batch", lambda batch, shard: batch)
    config = ml_collections.ConfigDict(dict(train=dict(batch_size=2),
                                            model=dict(dtype="float32", fusion=dict(name="concat"))))
    state = types.SimpleNamespace(params={"w": np.ones(3)})
    setup = step_benchmark.StepSetup(
        config=config, tasks=(), model=None, tx=None, batches=iter([{}] * 200), host_batch={}, batch={},
        state=state, train_step=None, step_fn=types.SimpleNamespace(lower=lambda state, batch: Lowered()),
        shard=None, loss_weights={})
    out = step_benchmark.benchmark(config, 2, setup)
    assert compiled_inside == [True] and out["parameters"] == 3


def test_a_real_sweep_of_two_fusions(tiny_builder, tmp_path, capsys):
    """Unmocked, on `synthetic_patients/tiny` (labs alone, 3 steps, one seed): each run trains in its own
    folder, the table holds each run's own test metric and its model's parameter count, and a second
    call reads everything back without training again."""
    from experiments import fusion_sweep
    from mmjax.experiment import Experiment

    c = fusion_sweep.get_config("smoke")
    c.data.data_dir = str(tiny_builder.data_dir_root)
    c.modalities = "tabular"
    c.train.update(num_steps=3, eval_every=3, checkpoint_every=3, log_every=3)
    c.sweep.update(fusions="concat,sum", seeds="0", benchmark_steps=1)
    rows = sweep.sweep(c, str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert sorted(r["fusion"] for r in rows) == ["concat", "sum"]
    # the sweep's console: a header and a result line per run, the table (head, rule, 2 rows), the time
    assert len(out) == 2 * 2 + 4 + 1 + 1, out
    for r in rows:
        run = tmp_path / r["fusion"] / "seed0"
        results = json.loads((run / "results.json").read_text())
        assert r["values"] == [results["test"]["macro_auroc"]] and r["mean"] == results["test"]["macro_auroc"]
        assert r["parameters"] == results["run"]["parameters"]
        assert f"validation macro_auroc {results['validation']['macro_auroc']:.4f}" in (run / "console.log").read_text()
        exp = Experiment.from_workdir(str(run))
        assert exp.config.model.fusion.name == r["fusion"]
        assert r["parameters"] == sum(x.size for x in jax.tree.leaves(exp.abstract_params()))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed0/results.json")}
    again = sweep.sweep(c, str(tmp_path))
    assert [r["mean"] for r in again] == [r["mean"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # read back, not retrained
