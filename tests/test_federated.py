"""Federated training (mmjax/training/federated.py): simulated sites with label and modality skew, the
weighted average and FedProx's term, a site's local steps reading only its own rows, one site equal to
ordinary training, and a run interrupted between rounds resuming to the uninterrupted parameters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.experiment import Experiment
from mmjax.training import federated, parallel
from tests.test_training import _final_params, smoke_config


def _config(tiny_builder, sites="3", modalities="tabular+signal", **kw):
    c = smoke_config(tiny_builder, f"smoke,modalities={modalities}")
    c.federated.update(sites=sites, local_steps=2, **kw)
    c.train.update(num_steps=6, eval_every=4, checkpoint_every=2)
    return c


def test_simulated_sites_deal_every_row_once_with_label_skew(tiny_builder):
    c = _config(tiny_builder, sites="4")
    exp = Experiment.from_config(c)
    sites = federated.assign_sites(exp, federated.settings(c))
    again = federated.assign_sites(exp, federated.settings(c))
    assert sites.names == ("site0", "site1", "site2", "site3") and sites.absent == {0: ("signal",)}
    for split in ("train", "validation", "test"):
        of = sites.of_split[split]
        assert len(of) == exp.spec.split_sizes[split] and set(of.tolist()) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(of, again.of_split[split])
    source = exp.builder.as_data_source("train")
    positive = np.array([float(source[i]["labels"]["diagnosis"][0]) for i in range(len(source))])
    rates = [positive[sites.of_split["train"] == k].mean() for k in range(4)]
    assert max(rates) - min(rates) > 0.2, rates  # Dirichlet(0.5) label skew
    with pytest.raises(Exception, match="no modality 'image'"):
        c.federated.absent = "1:image"
        federated.assign_sites(exp, federated.settings(c))
    # a site named by a number is matched by name before index
    assert federated._parse_absent("1:signal,2:tabular", ("1", "10", "2"), exp) == {0: ("signal",), 2: ("tabular",)}
    c.init_from = "/somewhere"
    with pytest.raises(Exception, match="init_from"):
        federated.settings(c)


def test_weighted_average_and_the_proximal_term():
    rng = np.random.default_rng(0)
    stacked = {"w": rng.normal(size=(3, 4, 5)), "b": rng.normal(size=(3, 5))}
    weights = np.array([30.0, 0.0, 10.0])
    got = federated.aggregate(jax.tree.map(jnp.asarray, stacked), jnp.asarray(weights))
    for k in stacked:
        np.testing.assert_allclose(got[k], 0.75 * stacked[k][0] + 0.25 * stacked[k][2], rtol=1e-6, atol=1e-6)
    prox = federated.proximal(0.1)
    w, a, g = (jnp.asarray(rng.normal(size=6)) for _ in range(3))
    state = prox.init(a)
    out, _ = prox.update(g, state, w)
    np.testing.assert_allclose(out, g + 0.1 * (w - a), rtol=1e-6)
    assert set(federated.participants(10, 0.3, 0, 5).tolist()) <= set(range(10))
    assert len(federated.participants(10, 0.3, 0, 5)) == 3 and len(federated.participants(10, 0.01, 0, 5)) == 1
    assert not np.array_equal(federated.participants(10, 0.3, 0, 5), federated.participants(10, 0.3, 0, 6))


def test_a_round_trains_every_site_from_the_round_model_and_averages_the_participants():
    """A toy step (params += batch) through `make_round`: each site starts from the round's model, a site that
    does not take part keeps its state and stays out of the average, even when it holds NaN."""
    from mmjax.training.state import TrainState

    def step(state, batch):
        return state.replace(params=state.params + batch, step=state.step + 1), {"loss": jnp.sum(batch)}

    round_fn = federated.make_round(step, prox=False)
    sites = TrainState(step=jnp.zeros(3, jnp.int32), params=jnp.array([[7.0], [8.0], [9.0]]), opt_state=jnp.zeros(3),
                       rng=jnp.zeros((3, 2), jnp.uint32))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=jnp.array([1.0]), opt_state=(),
                       rng=jnp.zeros(2, jnp.uint32))
    batches = jnp.array([[1.0, 1.0], [2.0, 2.0], [np.nan, 3.0]])[:, :, None]  # [S, L, 1]
    new, sites_after, metrics = round_fn(state, sites, batches, jnp.array([1.0, 3.0, 0.0]))
    np.testing.assert_allclose(new.params, [0.25 * (1 + 2) + 0.75 * (1 + 4)])
    np.testing.assert_allclose(sites_after.params[:2, 0], [3.0, 5.0])
    assert sites_after.params[2, 0] == 9.0 and list(sites_after.step) == [2, 2, 0]
    assert metrics["loss"].shape == (3, 2) and int(new.step) == 1


def test_a_site_reads_only_its_own_rows_and_lacks_its_absent_modality(tiny_builder, tmp_path):
    c = _config(tiny_builder, sites="3")
    fed = federated.init_or_restore(c, str(tmp_path))
    try:
        train_ids = fed.sites.ids["train"]
        batches, ids = federated.round_batches(federated.site_loaders(fed.exp, fed.sites, fed.members, 2, 0), 2)
        assert batches["signal"]["present"].shape[:2] == (3, 2)
        for k in range(3):
            own = set(train_ids[fed.sites.of_split["train"] == k].tolist())
            seen = {str(i) for b in ids[k] for i in b}
            assert seen and seen <= own, k
        assert not batches["signal"]["present"][0].any() and batches["signal"]["present"][1:].any()
        assert batches["tabular"]["present"][0].any()
    finally:
        fed.writer.close()
        fed.manager.close()


def test_one_site_is_ordinary_training(tiny_builder, tmp_path):
    """One site holding every row reads the ordinary loader's batches, and a round of L local steps is L
    ordinary steps from the same state (the experiment's own step, scanned)."""
    c = _config(tiny_builder, sites="1", modalities="tabular")
    c.federated.local_steps = 3
    fed = federated.init_or_restore(c, str(tmp_path))
    fed.writer.close(), fed.manager.close()
    loaders = federated.site_loaders(fed.exp, fed.sites, fed.members, 3, 1)  # from the second round
    batches, ids = federated.round_batches(loaders, 3)
    plain_loader = fed.exp.train_loader(c.train.batch_size, sampled=False, shard_index=0, shard_count=1,
                                        start_batch=3)
    plain = [b for _, b in zip(range(3), plain_loader)]
    assert all(np.array_equal(x, b["patient_id"]) for x, b in zip(ids[0], plain, strict=True))
    site = jax.tree.map(lambda x: x[0], fed.site_states)
    step = jax.jit(fed.exp.train_step())
    ordinary = site.replace(params=fed.state.params)
    for b in plain:
        ordinary, _ = step(ordinary, parallel.device_batch(b))
    state, sites, _ = fed.round_fn(fed.state, fed.site_states, batches, jnp.ones(1))
    _within_rounding(jax.tree.leaves(state.params), jax.tree.leaves(ordinary.params))
    assert int(sites.step[0]) == int(ordinary.step) == 3


def _within_rounding(got: list, want: list) -> None:
    """Two computations of the same parameters compiled differently (vmapped-and-scanned against step by step,
    or three sites against one): XLA rounds differently, and Adam turns a gradient that is rounding noise into a
    step of about the learning rate, compounding over rounds: the attention's key biases (their true gradient is
    0: softmax ignores a shift shared by all keys) drift apart by up to ~1e-3 after two rounds, a fraction of a
    percent of the parameters. A wrong batch, key, site or update moves most parameters by ~1e-4 to 1e-3."""
    diff = np.concatenate([np.abs(np.ravel(x) - np.ravel(y)) for x, y in zip(got, want, strict=True)])
    assert np.mean(diff > 1e-6) < 0.01 and np.mean(diff > 1e-5) < 0.005, (np.mean(diff > 1e-6), np.mean(diff > 1e-5))


def test_fedprox_with_partial_participation_resumes_to_the_uninterrupted_parameters(tiny_builder, tmp_path):
    c = _config(tiny_builder, sites="3", modalities="tabular", algorithm="fedprox", mu=0.05, fraction=0.5)
    c.train.update(num_steps=4, eval_every=4)  # 2 rounds of 2 local steps, validated at the end (CI time)
    whole = federated.train_federated(c, str(tmp_path / "whole"))
    assert whole["run"]["federated"]["rounds"] == 2 and set(whole["sites"]["groups"]) <= {"site0", "site1", "site2"}
    assert whole["run"]["federated"]["absent"] == {}  # 'auto': no signal modality in this run
    c.train.stop_at_step = 2
    assert federated.train_federated(c, str(tmp_path / "split")) == {"stopped_at_step": 2}
    c.train.stop_at_step = 0
    federated.train_federated(c, str(tmp_path / "split"))
    a, b = _final_params(str(tmp_path / "whole"))[0], _final_params(str(tmp_path / "split"))[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    events = [json.loads(line) for line in open(os.path.join(tmp_path, "split", "metrics.jsonl"))]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2]
    assert all(len(e["participants"].split(",")) == 2 for e in events if e["event"] == "train")
    saved = json.load(open(tmp_path / "whole" / "results.json"))
    assert saved["run"]["federated"]["algorithm"] == "fedprox" and "test" in saved


def _flower_round_trip(c, tmp_path, server_flags: list) -> str:
    """Runs a Flower server (its command line, a process of its own) and three sites' clients (threads) over
    loopback until the server ends; its output."""
    import socket
    import subprocess
    import sys
    import threading

    from mmjax.training import flower
    from tests.test_training import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mmjax.training.flower", "--role=server", f"--address={address}",
         f"--workdir={tmp_path / 'server'}", *server_flags], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    errors = []

    def site(k):
        try:
            flower.connect(c, str(tmp_path / f"site{k}"), address, f"site{k}", max_wait_s=120)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    clients = [threading.Thread(target=site, args=(k,), daemon=True) for k in range(3)]
    for t in clients:
        t.start()
    try:  # a client that fails ends the wait (the server would wait for it)
        for _ in range(400):
            if server.poll() is not None or errors:
                break
            try:
                server.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
    finally:
        server.kill()
        out = server.communicate()[0]
    for t in clients:
        t.join(timeout=60)
    assert server.returncode == 0 and not errors, (errors, out[-3000:])
    return out


def test_flower_server_and_three_clients_over_loopback_give_the_simulations_model(tiny_builder, tmp_path):
    """A Flower server and three mmjax clients over loopback gRPC: the server's model after each round is the
    in-process simulation's, within float rounding (same seeds and site order), every
    site's test metrics reach the server; a server and sites restarted before the last round's evaluation was
    recorded redo that round whole, to the same model bit for bit."""
    flwr = pytest.importorskip("flwr", reason="Flower is the federated extra: pip install -e '.[federated]'")
    from mmjax.training import flower

    c = _config(tiny_builder, sites="3", modalities="tabular", algorithm="fedprox", mu=0.05)
    c.train.update(num_steps=4, eval_every=4)  # 2 rounds of 2 local steps
    c.model.dropout = 0.1  # each site's own dropout key matters (tabular alone: modality dropout does nothing)
    flags = ["--config=experiments/synthetic_patients.py:smoke,modalities=tabular",
             "--config.federated.sites=3", "--config.federated.local_steps=2", "--config.federated.algorithm=fedprox",
             "--config.federated.mu=0.05", "--config.train.num_steps=4", "--config.train.eval_every=4"]
    _flower_round_trip(c, tmp_path, flags)
    server = str(tmp_path / "server")
    assert flower.saved_rounds(server) == [1, 2]

    fed = federated.init_or_restore(c, str(tmp_path / "simulation"))
    try:
        for r in (1, 2):
            fed.exp.config.train.stop_at_step = 2 * r
            federated.fit(fed)
            fed.start_round = r
            _within_rounding(flower.load_round(server, r), jax.tree.leaves(fed.state.params))
        results = json.load(open(tmp_path / "server" / "results.json"))
        assert set(results["sites"]) == {"site0", "site1", "site2"}
        assert results["run"]["federated"]["engine"] == f"flwr {flwr.__version__}"
        means = []
        for k in range(3):
            mine = federated.collect(fed.exp, fed.sites, fed.predict, "test", fed.state.params, site=k)
            want = task_metrics_of(fed, mine)
            sent = results["sites"][f"site{k}"]
            assert sent["metrics"]["macro_auroc"] == pytest.approx(want, abs=1e-4)
            assert sent["patients"] == len(np.unique(mine[3])) and "ci" in sent
            assert json.load(open(tmp_path / f"site{k}" / "eval" / "test.json"))["metrics"]["macro_auroc"] == \
                pytest.approx(want, abs=1e-4)
            means.append((want, sent["patients"]))
        assert results["test"]["macro_auroc"] == pytest.approx(
            sum(m * n for m, n in means) / sum(n for _, n in means), abs=1e-4)
    finally:
        fed.writer.close()
        fed.manager.close()

    # interrupted before the last round's test evaluation was recorded: round 2 is redone from round 1
    before = flower.load_round(server, 2)
    os.remove(os.path.join(server, "results.json"))
    history = open(os.path.join(server, "history.jsonl")).readlines()
    open(os.path.join(server, "history.jsonl"), "w").writelines(history[:-1])
    out = _flower_round_trip(c, tmp_path, flags)
    assert "Resuming after round 1" in out, out[-2000:]
    jax.tree.map(np.testing.assert_array_equal, flower.load_round(server, 2), before)
    assert os.path.exists(os.path.join(server, "results.json"))
    history = [json.loads(line) for line in open(os.path.join(server, "history.jsonl"))]
    assert [e["round"] for e in history if e["event"] == "train"] == [1, 2]  # the redone round's lines, once
    assert [e["round"] for e in history if e["event"] == "test"] == [2]
    with pytest.raises(Exception, match="another config"):
        c2 = c.copy_and_resolve_references()
        c2.optimizer.learning_rate *= 2
        flower.make_client(c2, str(tmp_path / "site1"), "site1")


def task_metrics_of(fed, collected) -> float:
    from mmjax.metrics import tasks

    return tasks.compute_metrics(*collected[:3], fed.exp.tasks)["macro_auroc"]


def test_flower_rounds_on_disk_and_the_round_a_server_resumes_after(tmp_path, tiny_builder):
    from mmjax.training import flower

    w = str(tmp_path)
    tree = {"a": np.arange(3.0), "b": {"c": np.ones((2, 2))}}
    for r in (1, 2, 3, 4):
        flower.save_round(w, r, jax.tree.map(lambda x, r=r: x * r, tree), keep=3)
    assert flower.saved_rounds(w) == [2, 3, 4]  # the newest three
    np.testing.assert_array_equal(flower.load_round(w, 3)[0], np.arange(3.0) * 3)
    with pytest.raises(Exception, match="not finite"):
        flower.save_round(w, 5, {"a": np.array([np.nan])})
    flower.drop_rounds_after(w, 2)
    assert flower.saved_rounds(w) == [2]

    opts = {"rounds": 4, "eval_every": 2}
    server = str(tmp_path / "server")
    for r in (1, 2):
        flower.save_round(server, r, tree)
    history = os.path.join(server, "history.jsonl")
    with open(history, "w") as f:
        f.write(json.dumps({"event": "train", "round": 1}) + "\n" + json.dumps({"event": "train", "round": 2}) + "\n")
    assert flower.resume_round(server, opts) == 1  # round 2's validation was not recorded: redo round 2
    with open(history, "a") as f:
        f.write(json.dumps({"event": "validation", "round": 2}) + "\n")
    assert flower.resume_round(server, opts) == 2
    flower.save_round(server, 3, tree)
    assert flower.resume_round(server, opts) == 3  # round 3 is not evaluated

    c = _config(tiny_builder, sites="3", algorithm="centralized")
    with pytest.raises(Exception, match="Flower runs fedavg or fedprox"):
        flower._plan(c)
    c.federated.update(algorithm="fedavg", fraction=0.5)
    with pytest.raises(Exception, match="every site trains each round"):
        flower._plan(c)
