"""DP-SGD (mmjax/training/privacy.py): each example's gradient clipped to C, the noise's standard deviation
as configured, epsilon the accountant's, DP with no noise and no clipping equal to ordinary training,
the sampled batches the plan's, and a DP run that resumes to the parameters of an uninterrupted one."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("jax_privacy", reason="pip install -e '.[privacy]'")
import dp_accounting  # noqa: E402
from dp_accounting import pld  # noqa: E402

from mmjax.console import ConfigError  # noqa: E402
from mmjax.experiment import Experiment  # noqa: E402
from mmjax.training import privacy  # noqa: E402
from mmjax.training.step import make_train_step  # noqa: E402
from mmjax.training.train import train_and_evaluate  # noqa: E402
from tests.test_training import smoke_config  # noqa: E402


def _dp_config(tiny_builder, **privacy_settings):
    c = smoke_config(tiny_builder, "smoke,modalities=tabular")  # one encoder: compiling is most of the time
    c.model.dropout = 0.0
    c.model.modality_dropout = 0.0
    c.privacy.update(dp=True, **privacy_settings)
    return c


def _plan(**kw):
    base = dict(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5, num_examples=2000, batch_size=50, capacity=80,
                num_steps=300, sampling="poisson")
    return privacy.Plan(**{**base, **kw})


def test_epsilon_is_the_accountants():
    plan = _plan()
    a = pld.PLDAccountant(value_discretization_interval=privacy.PLD_INTERVAL)
    a.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(dataset_size=2000, sampling_probability=0.025,
                                                               truncated_batch_size=80, noise_multiplier=1.1), 300)
    assert plan.epsilon(300) == pytest.approx(a.get_epsilon(1e-5), rel=1e-9)
    # no truncation (capacity = N): Poisson-sampled Gaussian; fixed-size batches: the same with sigma / 2
    for kw, sigma in ((dict(capacity=2000), 1.1), (dict(sampling="fixed", capacity=50), 0.55)):
        a = pld.PLDAccountant(value_discretization_interval=privacy.PLD_INTERVAL)
        a.compose(dp_accounting.PoissonSampledDpEvent(0.025, dp_accounting.GaussianDpEvent(sigma)), 300)
        assert _plan(**kw).epsilon(300) == pytest.approx(a.get_epsilon(1e-5), rel=1e-9), kw
    assert plan.epsilon(0) == 0 and _plan(noise_multiplier=0.0).epsilon(10) == math.inf
    assert plan.epsilon(100) < plan.epsilon(300)
    # the RDP accountant's bound is looser than the PLD's (Poisson, no truncation)
    from dp_accounting import rdp

    r = rdp.RdpAccountant()
    r.compose(dp_accounting.PoissonSampledDpEvent(0.025, dp_accounting.GaussianDpEvent(1.1)), 300)
    assert _plan(capacity=2000).epsilon(300) < r.get_epsilon(1e-5) < 1.3 * _plan(capacity=2000).epsilon(300)


def test_noise_calibrated_to_a_target_epsilon(tiny_builder):
    c = _dp_config(tiny_builder, target_epsilon=2.0)
    c.train.update(batch_size=16, num_steps=200)
    plan = privacy.plan(c, 256)
    assert plan.target_epsilon == 2.0 and plan.delta == pytest.approx(1 / 2560)
    assert 0.99 * 2.0 < plan.epsilon(200) <= 2.0
    assert dataclasses.replace(plan, noise_multiplier=0.99 * plan.noise_multiplier).epsilon(200) > 2.0
    assert plan.capacity == privacy.default_capacity(16) == 32


def test_unsupported_settings_are_refused(tiny_builder):
    for key, value, match in (("loss.task_weighting", "pcgrad", "task_weighting"),
                              ("loss.task_weighting", "dwa", "not privatized"), ("train.accum_steps", 2, "microbatch"),
                              ("privacy.sampling", "shuffle", "sampling"), ("parallel", "pmap", "mesh"),
                              ("privacy.clip_norm", math.inf, "finite"), ("privacy.microbatch", 5, "divide")):
        c = _dp_config(tiny_builder)
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
        with pytest.raises(ConfigError, match=match):
            privacy.plan(c, 256)


def test_the_noise_has_the_configured_standard_deviation():
    plan = _plan(noise_multiplier=1.3, clip_norm=0.7, batch_size=50)
    tx = privacy.privatizer(plan, seed=0)
    zeros = {"a": jnp.zeros((200, 300)), "b": jnp.zeros(40_000)}
    state = tx.init(zeros)
    draws = []
    for _ in range(3):
        noisy, state = tx.update(zeros, state)
        draws.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(noisy)]))
    draws = np.stack(draws)
    expected = 1.3 * 0.7 / 50
    assert np.std(draws) == pytest.approx(expected, rel=0.01) and abs(np.mean(draws)) < 0.01 * expected
    assert not np.allclose(draws[0], draws[1])  # a fresh draw each step
    again = privacy.privatizer(plan, seed=0)
    assert np.array_equal(np.ravel(again.update(zeros, again.init(zeros))[0]["b"]), draws[0][-40_000:])


def _steps(exp, clip, tx):
    """The DP step with clip norm `clip` and the ordinary step, both with `tx`."""
    common = dict(loss_weights=exp.loss_weights, **exp.loss_settings)
    return (jax.jit(make_train_step(exp.model, tx, exp.tasks, dp_clip=clip, **common)),
            jax.jit(make_train_step(exp.model, tx, exp.tasks, **common)))


def _one_batch(exp, capacity):
    from mmjax.data import pipeline

    loader = pipeline.train_loader(exp.builder, exp.spec, capacity, seed=0, augment=False, **exp.data_kwargs(),
                                   shard_index=0, shard_count=1)
    return next(iter(loader))


def test_each_example_gradient_is_clipped_to_the_norm(tiny_builder):
    """A batch with one real row: the DP step's gradient norm is min(C, that row's own gradient norm)."""
    c = _dp_config(tiny_builder)
    exp = Experiment.from_config(c)
    batch = _one_batch(exp, 8)
    from mmjax.data import pipeline
    from mmjax.training.parallel import device_batch

    state = exp.init_state(jax.random.PRNGKey(0))
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.params))
    clipped, _ = _steps(exp, 0.05, tx)
    unclipped, ordinary = _steps(exp, math.inf, tx)
    norms = []
    for i in range(4):
        only = jax.tree.map(lambda x, i=i: x[i:i + 1], batch)
        padded = device_batch(pipeline.pad_batch(only, 4))
        only = device_batch(only)
        own = float(ordinary(state, only)[1]["grad_norm"])
        assert float(unclipped(state, padded)[1]["grad_norm"]) == pytest.approx(own, rel=1e-4)
        got = float(clipped(state, padded)[1]["grad_norm"])
        assert got == pytest.approx(min(0.05, own), rel=1e-4)
        norms.append(own)
    assert max(norms) > 0.05  # the clipping was exercised


def test_no_noise_and_no_clipping_is_ordinary_training(tiny_builder):
    """Every label known and no padding: the sum of per-example gradients over B equals the batch gradient.
    (The auxiliary per-modality heads' loss is a mean over the rows that have the modality, which a sum of
    per-example losses over B is not when a modality is missing: off here.)"""
    c = _dp_config(tiny_builder, noise_multiplier=0.0)
    c.tasks = "diagnosis"  # always known in the synthetic data
    c.loss.modality_heads_weight = 0.0
    exp = Experiment.from_config(c)
    assert [t.name for t in exp.tasks] == ["diagnosis"]
    batch = _one_batch(exp, 16)
    assert bool(np.all(batch["label_mask"]["diagnosis"]))
    from mmjax.training.parallel import device_batch

    batch = device_batch(batch)
    state = exp.init_state(jax.random.PRNGKey(1))
    sgd = optax.sgd(1.0)
    plan = dataclasses.replace(exp.privacy, batch_size=16)
    dp_tx = optax.chain(privacy.privatizer(plan, 0), sgd)
    dp_step, _ = _steps(exp, math.inf, dp_tx)
    _, ordinary = _steps(exp, None, sgd)
    after_dp, m_dp = dp_step(state.replace(opt_state=dp_tx.init(state.params)), batch)
    after, m = ordinary(state.replace(opt_state=sgd.init(state.params)), batch)
    assert float(m_dp["loss"]) == pytest.approx(float(m["loss"]), rel=1e-5)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after.params, state.params))
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after_dp.params, after.params))
    assert max(float(jnp.max(jnp.abs(d))) for d in diff) < 1e-5 * max(float(jnp.max(jnp.abs(x))) for x in moved)


def test_a_dp_run_reads_the_plans_batches_logs_epsilon_and_resumes_exactly(tiny_builder, tmp_path):
    c = _dp_config(tiny_builder, noise_multiplier=1.0, clip_norm=0.5)
    c.train.update(num_steps=4, eval_every=2, checkpoint_every=2)
    exp = Experiment.from_config(c)
    plan = exp.privacy
    assert plan.capacity == 32 and plan.num_examples == 256
    batches = plan.batches(c.seed)
    assert len(batches) == 4 and all(map(np.array_equal, batches, plan.batches(c.seed)))  # a function of the seed
    assert not all(map(np.array_equal, batches, plan.batches(c.seed + 1)))
    ids = [str(exp.builder.as_data_source("train")[int(i)]["patient_id"]) for i in batches[2]]
    got = list(exp.train_loader(16, start_batch=2))
    assert len(got) == 2
    assert int(got[0]["example_mask"].sum()) == len(batches[2]) and got[0]["example_mask"].shape == (32,)
    assert [str(i) for i in got[0]["patient_id"][:len(ids)]] == ids
    whole = train_and_evaluate(c, str(tmp_path / "whole"))
    assert whole["run"]["privacy"]["epsilon"] == pytest.approx(plan.epsilon(4), rel=1e-9)
    assert whole["run"]["privacy"]["steps"] == 4 and whole["run"]["privacy"]["noise_multiplier"] == 1.0
    events = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert [e["step"] for e in events if e["event"] == "privacy"] == [2, 4]
    c.train.stop_at_step = 2
    assert train_and_evaluate(c, str(tmp_path / "split")) == {"stopped_at_step": 2}
    c.train.stop_at_step = 0
    train_and_evaluate(c, str(tmp_path / "split"))
    from tests.test_training import _final_params

    a, b = _final_params(str(tmp_path / "whole"))[0], _final_params(str(tmp_path / "split"))[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    saved = json.load(open(os.path.join(tmp_path, "whole", "results.json")))
    assert saved["run"]["privacy"]["sampling"] == "poisson"
    # what the noise and the accounting depend on cannot change on a resume, allow_config_change or not
    c.train.num_steps, c.allow_config_change = 6, True
    with pytest.raises(ConfigError, match=r"train.num_steps \(4 -> 6\)"):
        train_and_evaluate(c, str(tmp_path / "split"))
