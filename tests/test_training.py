"""Training: optimizer masks, mesh/pmap/single-device equality on 8 fake devices, checkpoints,
interrupt-and-resume equality, warm start, non-finite stop, config errors, launch.py end to end."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.console import ConfigError
from mmjax.data import pipeline, sources
from mmjax.experiment import Experiment
from mmjax.training import checkpoint, parallel
from mmjax.training.optimizer import decay_mask, make_optimizer
from mmjax.training.state import create_state
from mmjax.training.step import make_train_step
from mmjax.training.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(tiny_builder, arg="smoke"):
    spec = importlib.util.spec_from_file_location("exp", ROOT / "experiments" / "synthetic_patients.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    c = exp.get_config(arg)
    c.data.data_dir = str(tiny_builder.data_dir_root)
    return c


def test_weight_decay_skips_norms_and_biases():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)},
              "tab": {"feature_bias": jnp.ones((3, 4)), "feature_weight": jnp.ones((3, 4))},
              "task_log_vars": jnp.zeros(3)}
    mask = decay_mask(params)
    assert mask["dense"]["kernel"] and mask["tab"]["feature_weight"]
    assert not any([mask["dense"]["bias"], mask["ln"]["scale"], mask["tab"]["feature_bias"], mask["task_log_vars"]])


def test_learning_rate_warms_up_and_decays(tiny_builder):
    from mmjax.training.optimizer import learning_rate_schedule

    c = smoke_config(tiny_builder).optimizer
    c.warmup_steps, c.learning_rate = 10, 1e-3
    lr = learning_rate_schedule(c, 100)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(99)) == pytest.approx(1e-3 * c.end_lr_factor, rel=0.05)


def _setup(tiny_builder, tiny_spec, task_weighting="fixed", dropout=False, modalities="tabular"):
    # One modality, every task: what is tested is the parallel paths (the same computation on 1 device, on a
    # mesh of 8 and under pmap), and compiling the 4-modality model three times took 179 s of the suite.
    config = smoke_config(tiny_builder, f"smoke,modalities={modalities}")
    config.loss.task_weighting = task_weighting
    if dropout:
        config.model.update(modality_dropout=0.5, dropout=0.2)
    else:  # pmap draws its masks per device, as it must: the paths then see identical computations
        config.model.modality_dropout = 0.0
    exp = Experiment.from_spec(tiny_spec, config)
    tasks, model = exp.tasks, exp.model
    tx = make_optimizer(config.optimizer, 10)
    batch = next(iter(pipeline.train_loader(tiny_builder, tiny_spec, 16, 0, shard_index=0, shard_count=1,
                                            modalities=tuple(modalities.split("+")),
                                            text_max_length=config.data.text_max_length)))
    batch = parallel.device_batch(batch)
    state = create_state(model, tx, batch, jax.random.PRNGKey(0))
    return model, tx, tasks, batch, state, exp.loss_weights


def test_mesh_and_pmap_match_one_device(tiny_builder, tiny_spec):
    assert jax.device_count() == 8
    model, tx, tasks, batch, state, weights = _setup(tiny_builder, tiny_spec)
    step = make_train_step(model, tx, tasks, weights)
    replicated_state = parallel.replicate(jax.device_get(state))  # host copies: the mesh step donates
    one = jax.device_put((state, batch), jax.devices()[0])
    s1, m1 = jax.jit(step)(*one)

    mesh = parallel.make_mesh()
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    mesh_step = jax.jit(step, in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0)
    s2, m2 = mesh_step(jax.device_put(jax.device_get(state), repl), parallel.global_batch(batch, shard))
    assert len(m2["loss"].sharding.device_set) == 8

    pstep = jax.pmap(make_train_step(model, tx, tasks, weights, axis_name="data", num_shards=8), axis_name="data")
    s3, m3 = pstep(replicated_state, parallel.split_for_pmap(batch))
    s3, m3 = parallel.unreplicate(s3), parallel.unreplicate(m3)

    for m in (m2, m3):
        for k in ("loss", "loss_diagnosis", "loss_severity", "loss_mortality", "grad_norm"):
            np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    for s in (s2, s3):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), s.params, s1.params)


@pytest.mark.parametrize("weighting,k,mesh", [("fixed", 2, True), ("uncertainty", 4, False)])
def test_accumulated_microbatches_equal_the_whole_batch(tiny_builder, tiny_spec, weighting, k, mesh):
    """accum_steps=k: the same loss, per-task losses and update as the whole batch in one pass, with the
    auxiliary heads' counts (which the model's masks decide) and uncertainty weighting's log-variance terms.
    (PCGrad's task gradients are summed by the same code.)"""
    model, tx, tasks, batch, state, weights = _setup(tiny_builder, tiny_spec, weighting)
    batch = {**batch, "label_mask": {**batch["label_mask"]}}
    batch["label_mask"]["mortality"] = batch["label_mask"]["mortality"].copy()
    batch["label_mask"]["mortality"][1::3] = False  # unequal label counts across the microbatches
    host = jax.device_get(state)
    steps = [make_train_step(model, tx, tasks, weights, task_weighting=weighting, accum_steps=n) for n in (1, k)]
    if mesh:
        m = parallel.make_mesh()
        repl, shard = parallel.replicated(m), parallel.batch_sharding(m)
        run = [jax.jit(f, in_shardings=(repl, shard), out_shardings=(repl, repl)) for f in steps]
        args = lambda: (jax.device_put(host, repl), parallel.global_batch(batch, shard))
    else:
        run = [jax.jit(f) for f in steps]
        args = lambda: jax.device_put((host, batch), jax.devices()[0])
    (s1, m1), (sk, mk) = (f(*args()) for f in run)
    for key in ("loss", "loss_diagnosis", "loss_severity", "loss_mortality", "grad_norm"):
        np.testing.assert_allclose(float(mk[key]), float(m1[key]), rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), sk.params, s1.params)


def test_fsdp_creates_the_state_sharded_and_trains_as_replicated(tiny_builder, tiny_spec, tmp_path):
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.train.update(num_steps=4, eval_every=2, checkpoint_every=2, log_every=1)
    exp = Experiment.from_spec(tiny_spec, config)
    strategy = parallel.make_strategy("mesh", "fsdp")
    state = strategy.create_state(exp.init_state, jax.random.PRNGKey(0))
    big = max(jax.tree.leaves(state.params), key=lambda x: x.size)
    assert [s.data.size for s in big.addressable_shards] == [big.size // 8] * 8  # an eighth on each device
    mu = jax.tree.leaves(state.opt_state)
    assert any(x.shape == big.shape and x.sharding == big.sharding for x in mu)  # Adam's moments alike

    whole = parallel.make_strategy("mesh", "replicated").create_state(exp.init_state, jax.random.PRNGKey(0))
    sharded, replicated = (parallel.state_bytes_per_device(x) for x in (state, whole))
    assert sharded < replicated / 4, (sharded, replicated)

    config.sharding = "replicated"
    reference = train_and_evaluate(config, str(tmp_path / "replicated"))
    # FSDP for 2 steps, then resumed replicated (the checkpoint holds whole arrays, saved by shard)
    config.sharding, config.train.stop_at_step = "fsdp", 2
    assert train_and_evaluate(config, str(tmp_path / "mixed")) == {"stopped_at_step": 2}
    config.sharding, config.train.stop_at_step = "replicated", 0
    mixed = train_and_evaluate(config, str(tmp_path / "mixed"))
    losses = {n: [e["loss"] for e in map(json.loads, open(tmp_path / n / "metrics.jsonl")) if e["event"] == "train"]
              for n in ("replicated", "mixed")}
    assert len(losses["mixed"]) == 4
    np.testing.assert_allclose(losses["mixed"], losses["replicated"], rtol=1e-5)
    assert mixed["test"]["macro_auroc"] == pytest.approx(reference["test"]["macro_auroc"], abs=1e-6)


def test_mesh_draws_the_dropout_masks_of_one_device(tiny_builder, tiny_spec):
    """With dropout on, the mesh step (the global batch's masks, drawn sharded) is the one-device step: a
    run's randomness does not depend on the device count. (Modality dropout draws from the same key; with
    the one modality here it never drops a patient's only modality.)"""
    model, tx, tasks, batch, state, weights = _setup(tiny_builder, tiny_spec, dropout=True)
    step = make_train_step(model, tx, tasks, weights)
    host = jax.device_get(state)
    s1, m1 = jax.jit(step)(*jax.device_put((host, batch), jax.devices()[0]))
    mesh = parallel.make_mesh()
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    s2, m2 = jax.jit(step, in_shardings=(repl, shard), out_shardings=(repl, repl))(
        jax.device_put(host, repl), parallel.global_batch(batch, shard))
    _, m0 = jax.jit(step)(*jax.device_put((host.replace(rng=jax.random.PRNGKey(7)), batch), jax.devices()[0]))
    assert abs(float(m0["loss"]) - float(m1["loss"])) > 1e-3  # the masks are drawn and do change the loss
    for k in ("loss", "loss_diagnosis", "grad_norm"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), s2.params, s1.params)


def test_checkpoint_round_trip(tiny_builder, tiny_spec, tmp_path):
    _, _, _, _, state, _ = _setup(tiny_builder, tiny_spec)
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), every=1, keep=2)
    checkpoint.save(manager, 3, state, {"next_index": 17})
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, data_state = checkpoint.restore(manager, abstract)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert data_state == {"next_index": 17}
    manager.close()


def _final_params(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data")) as m:
        r = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return r["state"]["params"], m.latest_step()


@pytest.fixture(scope="session")
def uninterrupted(tiny_builder, tmp_path_factory):
    """A 7-step smoke run, checkpoints every 2 steps, shared by the tests below (session-scoped: not
    torn down between them, and the xdist workers each make their own, the second from the persistent
    compilation cache)."""
    config = smoke_config(tiny_builder)
    config.train.update(num_steps=7, checkpoint_every=2, eval_every=100, log_every=3)
    config.eval.update(baselines=True, ecg_intervals_max_rows=0)
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return config, workdir, train_and_evaluate(config, workdir)


def test_interrupted_and_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    config, a, full = uninterrupted
    assert full["run"]["train_step_recompilations_after_first_step"] == 0
    # the first step compiles the train step (and a few small placement programs), no more
    assert 1 <= full["run"]["compilations_in_first_step"] <= 10, full["run"]
    config = config.copy_and_resolve_references()
    b = str(tmp_path / "b")
    config.train.stop_at_step = 3  # "preempted" after step 3 (checkpoint at 2 and 3)
    assert train_and_evaluate(config, b) == {"stopped_at_step": 3}
    config.train.stop_at_step = 0
    resumed = train_and_evaluate(config, b)
    assert resumed["run"]["steps_run"] == 4
    pa, sa = _final_params(a)
    pb, sb = _final_params(b)
    assert sa == sb == 7
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert resumed["test"]["macro_auroc"] == pytest.approx(full["test"]["macro_auroc"], abs=1e-12)
    kept = sorted(int(p) for p in os.listdir(os.path.join(a, "checkpoints")) if p.isdigit())
    assert kept == [6, 7]  # keep_checkpoints=2; the only evaluated (best) one is 7
    events = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [e["step"] for e in events if e["event"] == "train"] == [3, 6, 7]  # one log, appended across the stop


@pytest.mark.parametrize("parallel", ["mesh", "pmap"])
def test_best_checkpoint_is_kept_with_the_latest(tiny_builder, tmp_path, parallel):
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.parallel = parallel
    config.train.update(num_steps=8, checkpoint_every=2, eval_every=2, log_every=2, keep_checkpoints=1)
    results = train_and_evaluate(config, str(tmp_path))
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    aurocs = {e["step"]: e["macro_auroc"] for e in events if e["event"] == "validation"}
    assert sorted(aurocs) == [2, 4, 6, 8]
    best = max(aurocs, key=aurocs.get)
    kept = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert kept == sorted({best, 8})
    # the final evaluation uses the best checkpoint (train.final_checkpoint='best')
    assert results["run"]["evaluated_step"] == best
    assert results["validation"]["macro_auroc"] == pytest.approx(aurocs[best], abs=1e-9)
    again = train_and_evaluate(config, str(tmp_path))  # relaunching the finished run: evaluation only
    assert again["run"]["steps_run"] == 0 and again["run"]["evaluated_step"] == best
    assert again["test"]["macro_auroc"] == pytest.approx(results["test"]["macro_auroc"], abs=1e-12)


def test_an_unreadable_best_checkpoint_leaves_the_final_evaluation_on_the_last_step(tiny_builder, tmp_path,
                                                                                     monkeypatch, capsys):
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.train.update(num_steps=4, checkpoint_every=2, eval_every=2, log_every=2)
    monkeypatch.setattr(ocp.CheckpointManager, "best_step", lambda self: 2)
    read = checkpoint.restore

    def restore(manager, abstract, step=None):
        if step == 2:
            raise ValueError("OUT_OF_RANGE: a truncated file\n(the rest of a long message)")
        return read(manager, abstract, step)

    monkeypatch.setattr(checkpoint, "restore", restore)
    results = train_and_evaluate(config, str(tmp_path))
    assert results["run"]["evaluated_step"] == 4
    out = capsys.readouterr().out
    assert "step 2, cannot be read (OUT_OF_RANGE: a truncated file): the final evaluation uses the last step, 4" in out


@pytest.mark.parametrize("lower", [False, True])
def test_manager_keeps_the_best_by_metric_besides_the_latest(tmp_path, lower):
    values = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7}  # higher is better: 2 is the best; lower: 1
    manager = checkpoint.make_manager(str(tmp_path), every=1, keep=1, metric="m", lower_is_better=lower)
    for step, value in values.items():
        checkpoint.save(manager, step, {"w": np.full(2, step, np.float32)}, {}, {"m": value})
    manager.wait_until_finished()
    best = 1 if lower else 2
    assert manager.best_step() == best
    assert sorted(manager.all_steps()) == [best, 4]
    manager.close()


def test_init_from_warm_starts_parameters(uninterrupted, tmp_path):
    config, src, _ = uninterrupted
    params, _ = _final_params(src)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    loaded, step = checkpoint.restore_params(src, abstract)
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    config = config.copy_and_resolve_references()
    config.init_from = src
    config.model.width = 16  # a different model cannot warm-start from it
    with pytest.raises(ValueError, match="init_from=.*has shape"):
        train_and_evaluate(config, str(tmp_path / "dst"))


def test_init_from_loads_named_subtrees_into_another_model(uninterrupted, tiny_builder, tiny_spec, tmp_path,
                                                            capsys):
    """Another dataset's model (its `image` modality called `xray`, no text or signal, concat fusion)
    takes run A's image and tabular encoders; its fusion and heads keep their fresh values."""
    _, src, _ = uninterrupted
    source, _ = _final_params(src)
    b = smoke_config(tiny_builder, "smoke,fusion=concat,modalities=xray+tabular")
    xray = dataclasses.replace(tiny_spec.modality("image"), name="xray", field="image")
    spec = dataclasses.replace(tiny_spec, modalities=(xray, tiny_spec.modality("tabular")))
    batch = next(pipeline.eval_batches(tiny_builder, tiny_spec, "train", 8, modalities=("image", "tabular"),
                                       text_max_length=b.data.text_max_length))
    batch["xray"] = batch.pop("image")
    fresh = Experiment.from_spec(spec, b).model.init(jax.random.PRNGKey(123), batch)["params"]
    assert sorted(fresh) == ["fusion", "heads", "modality_heads", "tabular_encoder", "xray_encoder"]

    subtrees = checkpoint.parse_subtrees("xray_encoder=image_encoder, tabular_encoder")
    assert subtrees == {"xray_encoder": "image_encoder", "tabular_encoder": "tabular_encoder"}
    loaded, step = checkpoint.restore_params(src, fresh, subtrees=subtrees)
    assert step == 7 and sorted(loaded) == sorted(fresh)
    jax.tree.map(np.testing.assert_array_equal, loaded["xray_encoder"], source["image_encoder"])
    jax.tree.map(np.testing.assert_array_equal, loaded["tabular_encoder"], source["tabular_encoder"])
    for name in ("fusion", "heads", "modality_heads"):  # not named: as initialized, not A's
        jax.tree.map(np.testing.assert_array_equal, loaded[name], fresh[name])
    assert not all(np.array_equal(a, s) for a, s in zip(jax.tree.leaves(loaded["heads"]),
                                                         jax.tree.leaves(source["heads"]), strict=True))
    assert not np.array_equal(fresh["tabular_encoder"]["feature_weight"], source["tabular_encoder"]["feature_weight"])

    with pytest.raises(ValueError, match=r"has no subtree \['ct_encoder'\]; it has \[.*'image_encoder'"):
        checkpoint.restore_params(src, fresh, subtrees={"xray_encoder": "ct_encoder"})
    with pytest.raises(ValueError, match=r"this model has no subtree \['image_encoder'\]; it has \['fusion'"):
        checkpoint.restore_params(src, fresh, subtrees={"image_encoder": "image_encoder"})
    with pytest.raises(ValueError, match=r"step 7: parameter \['tabular_encoder'\].* \(from 'image_encoder'\)"):
        checkpoint.restore_params(src, fresh, subtrees={"tabular_encoder": "image_encoder"})
    with pytest.raises(ValueError, match=r"init_from=.*(is missing|unexpected parameters)"):
        checkpoint.restore_params(src, fresh)  # everything: the models differ
    with pytest.raises(ValueError, match="is not 'name' or 'target=source'"):
        checkpoint.parse_subtrees("xray_encoder=")

    # The config route (one step of a tabular-only model); init_params without init_from is refused.
    b.init_from, b.init_params, b.modalities = src, "tabular_encoder", "tabular"
    b.train.update(num_steps=2, stop_at_step=1, log_every=1)
    capsys.readouterr()
    assert train_and_evaluate(b, str(tmp_path / "b")) == {"stopped_at_step": 1}
    n = sum(x.size for x in jax.tree.leaves(source["tabular_encoder"]))
    assert f"Initialized tabular_encoder ({n:,} of " in capsys.readouterr().out
    b.init_from = ""
    with pytest.raises(ValueError, match="init_params=.*init_from is empty"):
        train_and_evaluate(b, str(tmp_path / "c"))


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_builder, tmp_path):
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.loss.weights = "diagnosis=1.0,severity=inf,mortality=0.5"
    with pytest.raises(FloatingPointError, match="non-finite grad_norm, loss at step 1"):
        train_and_evaluate(config, str(tmp_path))


def test_bad_config_values_are_rejected(tiny_builder, tmp_path):
    config = smoke_config(tiny_builder)
    config.modalities = "image+xray"
    with pytest.raises(ValueError, match=r"unknown modalities \['xray'\]"):
        train_and_evaluate(config, str(tmp_path))
    config = smoke_config(tiny_builder)
    config.loss.weights += ",survival=1.0"
    with pytest.raises(ValueError, match=r"loss.weights names unknown task\(s\) \['survival'\]"):
        train_and_evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="unknown experiment argument"):
        smoke_config(tiny_builder, "smoke,fuson=late")


def test_loss_weights_default_to_one_skip_unselected_tasks_and_reject_unknown_names(tiny_builder, tiny_spec,
                                                                                   capsys):
    config = smoke_config(tiny_builder)

    def loss_weights(weights, tasks=""):
        with config.unlocked():
            config.loss.weights, config.tasks = weights, tasks
        return Experiment.from_spec(tiny_spec, config).loss_weights

    assert loss_weights(config.loss.weights) == {"diagnosis": 1.0, "severity": 0.67, "mortality": 0.1}
    assert capsys.readouterr().out == ""  # every weighted task is trained: no warning
    assert loss_weights("severity=2") == {"diagnosis": 1.0, "severity": 2.0, "mortality": 1.0}
    assert loss_weights("diagnosis=1.0,severity=0.67,mortality=0.5", "diagnosis") == {"diagnosis": 1.0}
    assert "['mortality', 'severity'] ignored" in capsys.readouterr().out
    # unknown even when its task would not be trained
    with pytest.raises(ValueError, match=r"loss.weights names unknown task\(s\) \['survival'\]"):
        loss_weights("diagnosis=1,survival=2", "diagnosis")
    with pytest.raises(ValueError, match="loss.weights: expected name=value"):
        loss_weights("diagnosis")


def test_a_tabular_only_model_learns_the_diagnosis(tiny_builder, tmp_path, capsys):
    """End to end on `synthetic_patients/tiny`: 60 steps on the labs alone reach a test diagnosis
    macro-AUROC far above chance (measured: 0.80 with seed 0, 0.79 with seed 1). `config.tasks`
    picks one task while `loss.weights` still names the other two: they are ignored with a warning."""
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.tasks = "diagnosis"
    config.model.update(width=32)
    config.model.fusion.name = "concat"  # the cheapest fusion to compile: this tests the training loop
    config.loss.modality_heads_weight = 0.0
    config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
    config.train.update(num_steps=60, batch_size=32, log_every=20, eval_every=60, checkpoint_every=60)
    results = train_and_evaluate(config, str(tmp_path))
    assert "loss.weights for ['mortality', 'severity'] ignored" in capsys.readouterr().out
    assert set(results["test"]) == {"diagnosis", "macro_auroc"}  # only the selected task is evaluated
    auroc = results["test"]["diagnosis"]["macro_auroc"]
    assert auroc > 0.7, results["test"]["diagnosis"]
    assert results["validation"]["diagnosis"]["macro_auroc"] > 0.65
    train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [e["loss_diagnosis"] for e in train if e["event"] == "train"]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses  # measured: 0.59, 0.43, 0.40


def _launch(tiny_builder, workdir, *flags):
    env = dict(os.environ, MMJAX_DATA_DIR=str(tiny_builder.data_dir_root))
    cmd = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / 'experiments/synthetic_patients.py'}:smoke",
           f"--workdir={workdir}", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_the_pytorch_twin_computes_what_mmjax_computes(tiny_builder):
    """`benchmarks/torch_model.py`, the default model in PyTorch that `benchmarks/step_vs_torch.py` times
    against, must stay the same model: outputs, losses and gradients equal on the smoke model (a fusion
    that gained a gate and a skip had left it behind once)."""
    pytest.importorskip("torch", reason="the PyTorch twin needs torch (pip install torch, the CPU wheel)")
    from benchmarks import torch_model
    from mmjax.benchmarks import train_step as step_benchmark

    s = step_benchmark.setup(smoke_config(tiny_builder))
    fusion = dict(s.model.fusion_kwargs)
    assert fusion.get("skip", True) and fusion.get("cross_gate", True)  # the defaults the twin must follow
    for sdpa in (False, True):
        net = torch_model.MultimodalModel(s.model, s.host_batch, sdpa=sdpa)
        torch_model.load_flax_params(net, s.state.params)
        report = torch_model.check_equivalence(s, net)
        assert report["max_grad_rel_error"] < 1e-4, report


def test_launch_end_to_end(tiny_builder, tiny_spec, tmp_path, recomputed):
    out = _launch(tiny_builder, tmp_path, "--config.model.fusion.name=late", "--config.train.num_steps=4",
                  "--config.modalities=tabular",  # the launcher is tested, not the model: the cheapest to compile
                  "--config.train.figures=True")  # (smoke runs leave the figures out)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "macro_auroc" in out.stdout and "steps/s" in out.stdout
    config = json.load(open(tmp_path / "config.json"))
    assert config["model"]["fusion"]["name"] == "late" and config["train"]["num_steps"] == 4
    results = json.load(open(tmp_path / "results.json"))
    for split in ("validation", "test"):  # what was written equals scikit-learn on the saved predictions
        reference = recomputed(tmp_path, split, tiny_spec.tasks)
        assert results[split]["macro_auroc"] == pytest.approx(reference["macro_auroc"], abs=1e-9)
        assert results[split]["severity"]["mae"] == pytest.approx(reference["severity"]["mae"], rel=1e-9)
        assert set(results[split]["diagnosis"]["labels"]) == set(tiny_builder.info.metadata["tasks"][0]["label_names"])
        assert results[split]["severity"]["mae"] > 0
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {"train", "validation", "test", "run"} <= {e["event"] for e in events}
    events_file = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    assert len(events_file) == 1
    tb = open(tmp_path / "tensorboard" / events_file[0], "rb").read()
    assert b"test/macro_auroc" in tb and b"report/roc" in tb and b"report/reliability" in tb  # figures as images
    # Orbax's INFO chatter is in the workdir's log, not on the console
    assert "CheckpointManager" not in out.stderr + out.stdout
    assert "CheckpointManager" in open(tmp_path / "mmjax.INFO").read()


def test_config_errors_name_the_setting_before_anything_is_built(tiny_builder, tiny_spec):
    """Through `Experiment` alone (no training): a setting that cannot work fails naming the flag."""
    from mmjax.console import ConfigError, UserError

    config = smoke_config(tiny_builder)
    shape = tiny_spec.modality("image").shape[:2]  # 32x32
    config.model.image.patch_size = 12
    with pytest.raises(ConfigError, match=rf"'image' is {shape[0]}x{shape[1]}: not divisible into 12x12 patches; "
                                          r"patch sizes that fit: \[8, 4, 2\]; set --config.model.image.patch_size=8"):
        Experiment.from_spec(tiny_spec, config).check()
    assert issubclass(ConfigError, UserError)
    config.model.image.patch_size = 8
    Experiment.from_spec(tiny_spec, config).check()
    config.model.fusion.name = "nosuch"
    with pytest.raises(ValueError, match="unknown fusion 'nosuch'; registered: .*'cross_attention'"):
        Experiment.from_spec(tiny_spec, config).check()
    config.model.fusion.name = "concat"
    config.loss.focal_gamma = -1.0
    with pytest.raises(ValueError, match="loss.focal_gamma=-1.0 must be >= 0"):
        Experiment.from_spec(tiny_spec, config).check()


def test_training_writes_intervals_and_evaluate_mode_reproduces_them(uninterrupted, tmp_path):
    """eval/<split>.json at the end of training: the results' metrics with bootstrap intervals;
    `launch.py --mode=evaluate` on a copy of the workdir (moved: nothing refers to its old path)
    rebuilds the run from config.json and dataset_spec.json and gives the same numbers."""
    import shutil

    _, src, full = uninterrupted
    rec = json.load(open(os.path.join(src, "eval", "test.json")))
    assert rec["step"] == full["run"]["evaluated_step"] == 7
    assert rec["metrics"]["macro_auroc"] == pytest.approx(full["test"]["macro_auroc"], abs=1e-12)
    ci = rec["ci"]["macro_auroc"]
    assert ci["low"] < rec["metrics"]["macro_auroc"] < ci["high"] and ci["high"] - ci["low"] > 0.01
    assert rec["bootstrap"]["resamples"] == 50 and rec["bootstrap"]["unit"] == "patient"
    assert set(rec["ci"]["diagnosis"]["labels"]) == set(rec["metrics"]["diagnosis"]["labels"])
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    os.remove(moved / "eval" / "test.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--workdir={moved}", "--mode=evaluate",
                          "--robustness=false", "--explain=0"],  # both: tested in-process below
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 7 (best by validation macro_auroc)" in out.stdout and "95% CI" in out.stdout
    groups = json.load(open(moved / "eval" / "test_subgroups.json"))  # per sex, age band, modality subset
    assert {"sex", "age", "modalities"} <= set(groups["variables"]) and "  sex (macro_auroc): female" in out.stdout
    assert sum(g["patients"] for g in groups["variables"]["sex"]["groups"].values()) == 120
    again = json.load(open(moved / "eval" / "test.json"))
    assert again["metrics"] == json.loads(json.dumps(rec["metrics"]))
    assert again["ci"] == rec["ci"]  # the same resamples (seeded)
    # the classical baselines beside the model: at the end of training and again by --mode=evaluate
    bl = json.load(open(os.path.join(src, "eval", "test_baselines.json")))
    assert bl["model"]["metrics"] == again["metrics"] and bl["model"]["ci"] == rec["ci"]  # the model's own numbers
    val = {n: b["validation"]["metrics"]["macro_auroc"] for n, b in bl["baselines"].items()}
    assert bl["best"] == max(val, key=val.get) and bl["chosen_on"] == "validation"
    assert {"tabular: gradient boosting", "text: TF-IDF + logistic regression", "late fusion", "prior",
            "signal: ECG features (neurokit2) + gradient boosting"} <= set(bl["baselines"])
    assert full["baselines"]["verdict"] == bl["verdict"] and f"vs best baseline ({bl['best']}" in bl["verdict"]
    assert bl["baselines"]["prior"]["test"]["metrics"]["macro_auroc"] == 0.5  # constant scores
    assert bl["verdict"] in out.stdout
    re_bl = json.load(open(moved / "eval" / "test_baselines.json"))
    assert {n: b["test"] for n, b in re_bl["baselines"].items()} == {n: b["test"] for n, b in bl["baselines"].items()}
    z = np.load(moved / "eval" / "test_predictions.npz")
    assert len(z["patient_id"]) == full["test"]["diagnosis"]["labels"]["pneumonia"]["count"]


def test_compare_two_runs_pairs_the_rows(uninterrupted, tmp_path, capsys):
    import shutil

    from mmjax.evaluation import compare
    from mmjax.metrics import delong

    _, src, full = uninterrupted
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    path = b / "eval" / "test_predictions.npz"
    z = dict(np.load(path))
    rng = np.random.default_rng(0)
    z["pred/diagnosis"] = np.clip(z["pred/diagnosis"] + rng.normal(0, 0.2, z["pred/diagnosis"].shape), 0, 1)
    np.savez(path, **z)
    same = compare.compare(str(a), str(a), resamples=100)["metrics"]["macro_auroc"]
    assert same["difference"] == 0 and same["p_value"] == 1.0
    result = compare.main([str(a), str(b), "--resamples=200", f"--out={tmp_path / 'c.json'}"])
    assert "p (DeLong)" in capsys.readouterr().out and json.load(open(tmp_path / "c.json"))["rows"] == result["rows"]
    m = result["metrics"]["macro_auroc"]
    assert m["a"] == pytest.approx(full["test"]["macro_auroc"], abs=1e-12)
    assert m["difference"] == pytest.approx(m["a"] - m["b"], abs=1e-12) and m["low"] < m["high"]
    assert result["metrics"]["severity.mae"]["difference"] == 0  # untouched task: identical on every resample
    y, known = z["label/diagnosis"][:, 0], z["mask/diagnosis"][:, 0]
    pa = np.load(a / "eval" / "test_predictions.npz")["pred/diagnosis"][:, 0]
    expect = delong.delong_test(y[known], pa[known], z["pred/diagnosis"][:, 0][known])
    name = json.load(open(a / "dataset_spec.json"))["tasks"][0]["label_names"][0]
    assert result["delong"][f"diagnosis.labels.{name}.auroc"] == pytest.approx(expect)
    z["patient_id"] = z["patient_id"][::-1]
    np.savez(path, **z)
    with pytest.raises(ValueError, match="different rows"):
        compare.compare(str(a), str(b), resamples=10)


def test_robustness_and_shapley_of_a_trained_run(uninterrupted, tmp_path):
    import shutil

    from mmjax.evaluation import attribution, robustness
    from mmjax.evaluation.format import format_robustness
    from mmjax.evaluation.predictor import Predictor
    from mmjax.evaluation.records import load_predictions

    _, src, full = uninterrupted
    shutil.copytree(src, tmp_path / "w")
    run = Predictor.from_workdir(str(tmp_path / "w"))
    out = robustness.analyze(run, "test", fractions=(0.0, 0.5, 1.0), sigmas=(0.5,))
    names = tuple(out["modalities"])
    assert len(names) == 4 and len(out["subsets"]) == 16
    flat = {tuple(s["present"]): s["metrics"] for s in out["subsets"]}
    assert flat[names]["macro_auroc"] == pytest.approx(full["test"]["macro_auroc"], abs=1e-9)
    for m in names:  # 0% missing is the full model, 100% the model without m
        curve = out["missing_fraction"][m]
        assert curve[0]["metrics"] == pytest.approx(flat[names])
        assert curve[-1]["metrics"] == pytest.approx(flat[tuple(n for n in names if n != m)])
        assert out["leave_one_out"][m]["macro_auroc"] == pytest.approx(
            flat[names]["macro_auroc"] - flat[tuple(n for n in names if n != m)]["macro_auroc"])
    assert "text" not in out["noise"] and len(out["noise"]["image"]) == 1
    # efficiency: per patient, the modalities' values sum to (all present) - (none present)
    z = np.load(tmp_path / "w" / "eval" / "test_shapley.npz")
    np.testing.assert_allclose(z["values"].sum(1), z["full"] - z["empty"], atol=1e-9)
    assert z["values"].shape == (len(z["patient_id"]), 4, len(z["outputs"]))
    shap = sum(v["macro_auroc"] for v in out["shapley_metrics"].values())
    assert shap == pytest.approx(flat[names]["macro_auroc"] - flat[()]["macro_auroc"], abs=1e-12)
    assert "left out" in format_robustness(out)

    source = sources.builder_from_config(run.config.data).as_data_source("test")
    assert out["presence"]["patients"] == len(source) == len(z["patient_id"])
    raw = {m: sum(bool(source[i]["present"][m]) for i in range(len(source))) for m in ("image", "signal")}
    assert {m: out["presence"]["present"][m] for m in raw} == raw and 0 < raw["image"] < len(source)
    ex = attribution.explain(run, "test", count=3)
    assert list(ex["patient_id"]) == list(z["patient_id"][:3])
    assert ex["attribution/image"].shape[:1] == (3,) and ex["tokens/text"].shape == ex["attribution/text"].shape
    change = np.abs(ex["f_input"] - ex["f_baseline"])
    np.testing.assert_allclose(ex["completeness_gap"], 0, atol=0.02 * change.max() + 1e-4)
    assert ex["attention"].shape[:2] == (3, 1) and ex["token_modality"].shape == ex["attention"].shape[-1:]
    assert np.load(tmp_path / "w" / "eval" / "test_attributions.npz")["output"] == ex["output"]
    # the report: built from the files above (same step), every figure present and drawn
    import base64
    import re

    from mmjax.evaluation.report import build_report

    page = open(build_report(str(tmp_path / "w"), explain=3)).read()
    figures = dict(re.findall(r'<figure id="(\w+)"><img alt="\w+" src="data:image/png;base64,([^"]+)"', page))
    assert {"roc", "pr", "reliability", "robustness", "shapley", "patient0", "patient1", "patient2"} <= set(figures)
    for name, data in figures.items():  # drawn: coloured pixels (curves, bars, heatmaps), not only axes and text
        assert _coloured_fraction(base64.b64decode(data)) > 0.003, name  # axes with only legends: 0.0023
    rec = json.load(open(tmp_path / "w" / "eval" / "test.json"))
    from mmjax.evaluation import figures

    panels = [ax for ax in figures.reliability_figure(rec).axes if ax.axison]
    assert [ax.get_title() for ax in panels] == list(rec["calibration"])
    for ax in panels:  # raw and scaled curves with their occupied bins, and the diagonal
        bins = [sum(c > 0 for c in rec["calibration"][ax.get_title()][key]["count"])
                for key in ("reliability", "reliability_scaled")]
        assert [len(line.get_xdata()) for line in ax.get_lines()] == bins + [2], ax.get_title()
    preds, labels, masks, _ = load_predictions(str(tmp_path / "w"), "test", run.tasks)
    roc = figures.roc_figure(preds, labels, masks, run.tasks)
    both = lambda y: 0 < y.sum() < len(y)  # a ROC curve needs positives and negatives
    expect = [sum(both(labels["diagnosis"][masks["diagnosis"][:, k], k]) for k in range(labels["diagnosis"].shape[1])),
              int(both(labels["mortality"][masks["mortality"]]))]
    assert [len(ax.get_lines()) - 1 for ax in roc.axes if ax.get_lines()] == [n for n in expect if n]  # - chance
    assert re.search(r"<td>macro_auroc \(all binary outputs\)</td><td>0\.\d{4}</td><td>\[0\.\d{4}, 0\.\d{4}\]</td>",
                     page)
    assert page.count("(attention from other modalities)") == 3 and page.count("(integrated gradients)") == 3
    rate = out["presence"]["present"]["image"] / out["presence"]["patients"]
    assert f"<td>image</td><td>image</td><td>{rate:.1%}</td>" in page
    assert "<h2>Classical baselines</h2>" in page and "vs best baseline (" in page  # the session's run fits them
    assert "Operating points" in page and os.path.getsize(tmp_path / "w" / "report" / "roc.png") > 1000
    chosen = str(z["patient_id"][1])  # a chosen patient (--patients=ID): shown alone (its attributions reused)
    page = open(build_report(str(tmp_path / "w"), patients=[chosen])).read()
    assert page.count("<h3>patient ") == 1 and f"<h3>patient {chosen}:" in page
    with pytest.raises(ValueError, match=r"no patient\(s\) \['nobody'\]"):
        attribution.explain(run, "test", patients=["nobody"])


def test_pick_rows_for_explanations():
    from mmjax.evaluation.attribution import pick_rows

    def batch(ids, real):
        return {"patient_id": np.array(ids), "example_mask": np.array(real), "x": {"v": np.arange(len(ids)) * 10}}

    batches = [batch(["a", "b", "c"], [True] * 3), batch(["d", "b", ""], [True, True, False])]
    first = pick_rows(iter(batches), 4)
    assert list(first["patient_id"]) == ["a", "b", "c", "d"] and list(first["x"]["v"]) == [0, 10, 20, 0]
    chosen = pick_rows(iter(batches), 0, ["b", "d"])  # every row of b (two batches) and d
    assert list(chosen["patient_id"]) == ["b", "d", "b"] and list(chosen["x"]["v"]) == [10, 0, 10]
    with pytest.raises(ValueError, match=r"no patient\(s\) \['z'\]"):
        pick_rows(iter(batches), 0, ["a", "z"])


def _coloured_fraction(png: bytes) -> float:
    """Fraction of pixels with a colour (max - min channel > 40): what curves, bars and heatmaps draw."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16)
    return float(np.mean(rgb.max(-1) - rgb.min(-1) > 40))


def test_report_figures_confusion_matrix_and_attention_of_latent_queries():
    """The confusion figure (no smoke dataset has a multiclass task) and attention from latent queries."""
    from mmjax.batch import TaskSpec
    from mmjax.evaluation import figures as report

    task = TaskSpec("dx", "multiclass", ("a", "b", "c", "never"))
    rec = {"metrics": {"dx": {"confusion_matrix": [[5, 1, 0, 0], [2, 7, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]],
                              "accuracy": 15 / 19}}}
    fig = report.confusion_figure(rec, [task])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]  # 'never' occurs nowhere
    assert [t.get_text() for t in ax.texts] == ["5", "1", "0", "2", "7", "1", "0", "0", "3"]
    assert _coloured_fraction(report.png(fig)) > 0.05
    assert report.confusion_figure(rec, [TaskSpec("y", "binary")]) is None
    seg = np.array([0, 0, 0, 0, 1, 1])  # 4 image patches, 2 words
    w = np.arange(12, dtype=float).reshape(2, 6)  # 2 latents x 6 tokens (perceiver)
    np.testing.assert_array_equal(report.attention_received(w, seg, 1), w[:, 4:].sum(0))
    tokens = np.random.default_rng(0).random((6, 6))  # token queries (cross-attention)
    queries = np.array([True, True, False, True, True, True])  # patch 2 is not a query (e.g. padding)
    np.testing.assert_allclose(report.attention_received(tokens, seg, 1, queries), tokens[[0, 1, 3]][:, 4:].sum(0))
    np.testing.assert_allclose(report.attention_received(tokens, seg, 0), tokens[4:, :4].sum(0))


def test_a_config_key_typo_is_one_line_and_leaves_no_workdir(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config.train.num_step=5",
                          f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr.strip() == ('error: the config has no key \'num_step\' (Did you mean "num_steps" instead of '
                                  '"num_step"?); overrides given: --config.train.num_step=5'), out.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_a_manifest_run_without_its_manifest_names_the_flag():
    from experiments import manifest
    from mmjax.data.spec import DataError

    c = manifest.get_config()
    with pytest.raises(DataError, match=r"--config.data.manifest is not set"):
        sources.builder_from_config(c.data)
    c.data.manifest = "m.csv"
    with pytest.raises(DataError, match=r"--config.data.schema is not set: the manifest m.csv needs a YAML schema"):
        sources.builder_from_config(c.data)


def test_evaluating_a_step_that_was_not_saved_lists_the_saved_ones(uninterrupted):
    from mmjax.console import UserError
    from mmjax.evaluation.predictor import Predictor

    _, src, _ = uninterrupted
    saved = sorted(int(d) for d in os.listdir(os.path.join(src, "checkpoints")) if d.isdigit())
    with pytest.raises(UserError, match=re.escape(f"no checkpoint of step 1000; the steps saved are {saved}")):
        Predictor.from_workdir(src, step=1000)


# ------------------------------------------------------------------------ faults: checkpoints and resume


def _steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _truncate_data_files(step_dir):
    """Truncates every OCDBT data file of a checkpoint's state to half (a disk fault, a partial copy)."""
    files = [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


class _FailingIterator:
    """A training iterator that raises on its `fail_at`-th batch (a crash between checkpoints)."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_a_non_finite_state_is_never_saved(tiny_builder, tmp_path):
    """The reproduction: learning rate 1e38, logs and evaluations every 10 steps, checkpoints every 3,
    keep 2. Before the fix the checkpoints of steps 3 and 6 held NaN parameters and rotated out every
    good one."""
    config = smoke_config(tiny_builder, "smoke,modalities=tabular")
    config.optimizer.learning_rate = 1e38
    config.train.update(num_steps=20, log_every=10, eval_every=10, checkpoint_every=3, keep_checkpoints=2)
    with pytest.raises(checkpoint.NonFiniteState, match=r"non-finite .*at step [1-3]\b.*no checkpoint"):
        train_and_evaluate(config, str(tmp_path))
    assert _steps(tmp_path) == []


def test_after_a_nan_or_a_corrupt_checkpoint_the_last_good_one_is_the_resume_point(uninterrupted, tmp_path,
                                                                                    caplog):
    config, a, _ = uninterrupted
    config = config.copy_and_resolve_references()
    config.eval.baselines = False  # not what this test is about (5-10 s a finished run)
    b = str(tmp_path / "b")
    config.train.stop_at_step = 4
    train_and_evaluate(config, b)  # checkpoints 2 and 4, finite
    config.train.stop_at_step = 0
    bad = config.copy_and_resolve_references()
    bad.loss.weights = "diagnosis=1.0,severity=inf,mortality=0.5"  # the loss is inf from step 5 on
    bad.allow_config_change = True
    with pytest.raises(checkpoint.NonFiniteState, match=r"at step 5.*the last checkpoint, step 4"):
        train_and_evaluate(bad, b)
    assert _steps(b) == [2, 4]
    # the reproduction: the latest checkpoint's data files truncated; the relaunch (the sane config again)
    # resumes from the previous one and ends as the uninterrupted run
    _truncate_data_files(os.path.join(b, "checkpoints", "4"))
    # no flag needed: the failed attempt (from_step_4.json) trained nothing, the checkpoints are the sane config's
    assert train_and_evaluate(config, b)["run"]["steps_run"] == 5  # from step 2
    assert "checkpoint step 4" in caplog.text and "cannot be read" in caplog.text
    assert os.path.isdir(os.path.join(b, "checkpoints.unreadable", "4"))  # set aside, not deleted
    jax.tree.map(np.testing.assert_array_equal, _final_params(a)[0], _final_params(b)[0])
    events = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == sorted(set(train_steps)) == [3, 6, 7]  # step 3 trained twice, written once


def test_evaluation_falls_back_from_an_unreadable_best_checkpoint(uninterrupted, tmp_path):
    _, a, _ = uninterrupted
    c = str(tmp_path / "c")
    shutil.copytree(a, c)
    _truncate_data_files(os.path.join(c, "checkpoints", "7"))  # the best (the only one evaluated)
    exp = Experiment.from_workdir(c)
    _, step, chosen = exp.restore_params()
    assert step == 6 and "step 7 cannot be read" in chosen
    with pytest.raises(Exception, match="OUT_OF_RANGE|[Tt]runcat|[Cc]orrupt|[Ee]rror reading"):  # noqa: B017
        exp.restore_params(step=7)  # an explicit --step does not fall back


def test_a_resume_with_another_config_is_refused_before_anything_is_written(uninterrupted, tiny_builder,
                                                                          tmp_path):
    _, a, _ = uninterrupted
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    before = {p: p.stat().st_mtime_ns for p in pathlib.Path(b).rglob("*")}
    # the reproduction: the smoke variant's workdir relaunched with the default experiment
    config = smoke_config(tiny_builder, None)
    with pytest.raises(ConfigError, match=r"holds checkpoints \(steps \[6, 7\]\) of a run with another config: "
                                          r".*model\.width: 32 -> 64.*allow_config_change=True"):
        train_and_evaluate(config, b)
    assert {p: p.stat().st_mtime_ns for p in pathlib.Path(b).rglob("*")} == before
    config = uninterrupted[0].copy_and_resolve_references()
    config.model.width = 64
    config.lock()  # as --config.allow_config_change=True sets it: the key must exist
    config.allow_config_change = True
    with pytest.raises(ValueError, match=r"checkpoint step 7 .* holds another model's state"):
        train_and_evaluate(config, b)  # allowed, but another model cannot restore: an error, nothing set aside
    assert _steps(b) == [6, 7] and not os.path.exists(os.path.join(b, "checkpoints.unreadable"))


def test_a_resume_on_other_data_is_refused_and_each_config_is_kept(uninterrupted, tmp_path):
    config, a, _ = uninterrupted
    config = config.copy_and_resolve_references()
    config.eval.baselines = False  # not what this test is about (5-10 s a finished run)
    b = str(tmp_path / "b")
    config.train.stop_at_step = 3
    train_and_evaluate(config, b)
    # the spec of the start that trained the checkpoints, kept beside its config; dataset_spec.json (which an
    # attempt that failed before saving may have rewritten) is not what a resume compares with
    trained = pathlib.Path(b, "configs", "dataset_spec_from_step_0.json")
    spec = json.loads(trained.read_text())
    assert spec == json.loads(pathlib.Path(b, "dataset_spec.json").read_text())
    spec["split_sizes"]["train"] += 1  # as if the checkpoints had been trained on a dataset with other fractions
    trained.write_text(json.dumps(spec))
    config.train.stop_at_step = 5  # a key a resume may change
    with pytest.raises(ConfigError, match=r"prepared dataset differs .*\(in split_sizes\)"):
        train_and_evaluate(config, b)
    trained.write_text(json.dumps({**spec, "split_sizes": {**spec["split_sizes"],
                                                           "train": spec["split_sizes"]["train"] - 1}}))
    config.optimizer.learning_rate *= 0.5
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate"):
        train_and_evaluate(config, b)
    config.allow_config_change = True
    assert train_and_evaluate(config, b) == {"stopped_at_step": 5}
    kept = {p.name: json.loads(p.read_text())["optimizer"]["learning_rate"]
            for p in pathlib.Path(b, "configs").glob("from_step_*.json")}
    lr = config.optimizer.learning_rate
    assert kept == {"from_step_0.json": lr * 2, "from_step_3.json": lr}
    assert sorted(p.name for p in pathlib.Path(b, "configs").glob("dataset_spec_*")) == [
        "dataset_spec_from_step_0.json", "dataset_spec_from_step_3.json"]


def test_evaluation_refuses_data_that_changed_since_training(uninterrupted, tmp_path):
    """--mode=evaluate, report and predict prepare the data the run's config names: a manifest edited since
    training prepares another partition (a new keyed folder), which must not be evaluated as the run's."""
    from mmjax.evaluation.predictor import Predictor

    _, a, _ = uninterrupted
    w = shutil.copytree(a, tmp_path / "w")
    assert Predictor.from_workdir(w).experiment.splits  # unchanged: reads the data
    spec = json.loads((w / "dataset_spec.json").read_text())
    spec["split_sizes"]["test"] += 1  # as if the run had been trained before rows moved between splits
    (w / "dataset_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"trained on a dataset with other split sizes .*'test': 121.*'test': 120"):
        Predictor.from_workdir(w).batches("test")


def test_an_error_in_the_loop_leaves_no_half_written_checkpoint_and_no_repeated_step(uninterrupted, tmp_path,
                                                                                    monkeypatch):
    config, a, _ = uninterrupted
    config = config.copy_and_resolve_references()
    config.eval.baselines = False  # not what this test is about (5-10 s a finished run)
    b = str(tmp_path / "b")
    loader = Experiment.train_loader
    # reading the 6th batch fails, while step 4 takes its batch (the loop puts batches on the device
    # data.device_prefetch=2 steps ahead): step 3 was logged (log_every=3), step 2 was the last checkpoint
    assert config.data.device_prefetch == 2
    monkeypatch.setattr(Experiment, "train_loader",
                        lambda self, *args, **kw: _FailingIterator(iter(loader(self, *args, **kw)), fail_at=6))
    with pytest.raises(RuntimeError, match="injected fault"):
        train_and_evaluate(config, b)
    monkeypatch.undo()
    names = os.listdir(os.path.join(b, "checkpoints"))
    assert not [n for n in names if "tmp" in n], names
    assert _steps(b) == [2]  # committed, none half-written
    train_and_evaluate(config, b)
    train_and_evaluate(config, b)  # a finished run relaunched evaluates again: its records are written once
    events = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [e["step"] for e in events if e["event"] == "train"] == [3, 6, 7]
    assert [e["event"] for e in events].count("test") == [e["event"] for e in events].count("run") == 1
    jax.tree.map(np.testing.assert_array_equal, _final_params(a)[0], _final_params(b)[0])


def test_pmap_draws_other_dropout_masks_on_each_device(tiny_builder, tiny_spec):
    """The reproduction: on 2 devices pmap's modality-dropout keep matrices were equal row by row, as
    the step folded only the step number into the key. The dropout key now folds in the device index;
    the key that must agree across devices (PCGrad's projection order) does not."""
    from mmjax.training.step import step_keys

    state = _setup(tiny_builder, tiny_spec)[4]
    keys = jax.pmap(lambda s: step_keys(s, "data"), axis_name="data")(parallel.replicate(jax.device_get(state)))
    shared, dropout = (np.asarray(jax.random.key_data(k)) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key)
                       else np.asarray(k) for k in keys)
    assert len({tuple(k.ravel()) for k in dropout}) == 8  # one dropout key per device
    assert len({tuple(k.ravel()) for k in shared}) == 1
    one_shared, one_dropout = step_keys(state)  # jitted over a mesh: one key, as before
    np.testing.assert_array_equal(one_shared, one_dropout)
    np.testing.assert_array_equal(shared[0], np.asarray(one_shared))


def test_a_run_killed_inside_a_save_resumes_to_the_same_parameters(uninterrupted, tmp_path, capsys):
    """The fault-injection script (`mmjax/benchmarks/fault_injection.py`; 20 trials by hand, in
    docs/results.md), small: one trial killed with SIGKILL inside an asynchronous checkpoint save, resumed,
    and compared bitwise with the session's uninterrupted run (trained in this process, same command)."""
    from mmjax.benchmarks import fault_injection

    config, reference, _ = uninterrupted
    t = config.train
    same = [f"--config.train.{k}={t[k]}" for k in ("num_steps", "checkpoint_every", "eval_every", "log_every")]
    code = fault_injection.main([f"--workdir={tmp_path}", "--trials=1", "--moments=save", f"--reference={reference}",
                                 "--", "--config=experiments/synthetic_patients.py:smoke",
                                 f"--config.data.data_dir={config.data.data_dir}", *same])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "fault_injection.json").read_text())
    (trial,) = summary["trials"]
    assert trial["killed"] and trial["relaunches"] == 1, (trial, out)  # it died inside the save, then resumed
    assert trial["differences"] == [] and code == 0, out
    assert "1 of 1 trials ended bitwise equal to the uninterrupted run (1 killed" in out


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetch_to_device_puts_batches_ahead_in_order(size):
    """The loop's device prefetch: every batch, in order, each put `size` batches before it is taken."""
    log = []

    def batches():
        for i in range(5):
            log.append(("read", i))
            yield {"x": np.full(2, i)}

    def put(batch):
        log.append(("put", int(batch["x"][0])))
        return jax.device_put(batch)

    out = []
    for batch in parallel.prefetch_to_device(batches(), size, put):
        i = int(batch["x"][0])
        assert isinstance(batch["x"], jax.Array)
        # when batch i is taken, the batches up to i + size have been put (those that exist)
        assert ("put", min(i + size, 4)) in log and ("put", min(i + size, 4) + 1) not in log, (i, log)
        out.append(i)
    assert out == [0, 1, 2, 3, 4]


def test_the_step_benchmark_counts_model_flops_without_the_recompute(tiny_builder):
    """`mmjax.benchmarks.train_step` reports MFU on the model's FLOPs: with `model.remat` the step's
    jaxpr does more work (the forward again inside the backward), and the count it reports is still
    that of the step without remat; the row has every figure, consistent with one another."""
    from mmjax.benchmarks import flops
    from mmjax.benchmarks import train_step as step_benchmark

    remat_config = smoke_config(tiny_builder)
    remat_config.model.remat = "encoders+fusion"
    remat = step_benchmark.setup(remat_config)
    model = flops.count(Experiment.from_config(smoke_config(tiny_builder)).train_step(), remat.state, remat.batch)
    assert step_benchmark.model_flops(remat_config, remat) == model
    recomputing = flops.count(remat.train_step, remat.state, remat.batch)
    assert recomputing["matmul"] > 1.2 * model["matmul"], (recomputing, model)
    row = step_benchmark.benchmark(remat_config, 2, remat, loop_warmup=2)
    assert row["remat"] == "encoders+fusion" and row["model_tflops_per_step"] == round(model["total"] / 1e12, 4)
    step_s = row["step_ms"] / 1e3
    assert row["mfu"] == pytest.approx(model["matmul"] / step_s / (row["peak_tflops"] * 1e12), rel=0.01)
    assert row["input_share"] == pytest.approx(max(0.0, 1 - row["step_ms"] / row["loop_step_ms"]), abs=0.002)
    assert row["temp_mib"] > 0 and row["executable_mib"] >= row["temp_mib"]
