"""Federated training across real sites over Flower (`flwr`, https://flower.ai): an mmjax client at each
site, a server with Flower's own FedAvg or FedProx strategy. `pip install -e ".[federated]"`.

    # the server (holds no data; every site and the server use the same config file and flags)
    python -m mmjax.training.flower --role=server --address=0.0.0.0:8080 --workdir=W --num_sites=3 \
        --config=experiments/manifest.py:... --config.federated.sites=hospital --config.federated.local_steps=10
    # each site, with its own manifest (or the shared one: it trains and reports on its site's rows only)
    python -m mmjax.training.flower --role=client --address=server:8080 --site=north --workdir=W_north \
        --config=experiments/manifest.py:... --config.federated.sites=hospital --config.federated.local_steps=10

A round is the simulation's (`mmjax/training/federated.py`): the server sends the round's model, each
site takes `federated.local_steps` steps of the experiment's train step on its own rows (the same
compiled local round, its own optimizer state kept between rounds, its dropout key and batch order
seeded as the simulation seeds its k-th site) and sends back its parameters and training row count; the
strategy averages them weighted by those counts. With the same config, data and site order the server's
model equals the simulation's within float rounding (tested over loopback: a server and three clients).

- Rounds: `train.num_steps / federated.local_steps` (`train.stop_at_step` is the simulation's). Each round
  trains every site: the server waits until all `--num_sites` are connected, and stops at more, at a site
  that answers twice or fails, and at a site whose `local_steps`, rounds or mu differ from its own
  (`federated.fraction` < 1 is the simulation's; Flower's sampling of clients differs).
- The server writes each round's model (`W/rounds/round_NNNN.npz`, the parameter leaves in the model's
  order) and `W/history.jsonl`; each site its state after the round it last trained (its parameters and
  optimizer state, `W_site/rounds/`, the newest two kept). A restarted server resumes after its last
  round whose evaluation was recorded (a round is redone whole), a restarted site from its state after
  the round before the one the server asks for; a config other than the one the rounds were made with
  is refused (`flower_config.json`). After a failure restart every process: a site's client ends with
  the server's stream.
- Evaluation: every `train.eval_every / local_steps` rounds each site evaluates the round's model on its
  validation rows (a site without any reports none, and a site's undefined metric, e.g. AUROC of one
  class, is left out of the mean); after the last round, instead, on its test rows,
  with patient bootstrap intervals (`W_site/eval/test.json`). The server writes every site's test
  metrics and their mean weighted by test patients (not a pooled metric: no predictions leave a site)
  to `W/results.json`. This is the last round's model (the simulation's `results.json` is the best round
  by validation). Flower's `loss` slot carries 1 - `best_metric` (the metric itself when lower is better).
- Only parameters, row counts and metrics leave a site. The preparation (vocabulary, standardization)
  is each site's own unless the sites share one config and data preparation, as in the test. A site
  reading its own manifest finds one site in it, so it is site 0 there: the simulation's seeding of the
  k-th site needs the shared manifest; with manifests of their own give the sites different
  `--config.seed` for their own dropout keys and batch order (the model they start from is the one the
  server takes from one connected site, the same for all).
- Flower's `start_server`/`start_client` are its gRPC API, deprecated since flwr 1.13 in favour of the
  SuperLink/SuperNode deployment but maintained in 1.x; telemetry is off (`FLWR_TELEMETRY_ENABLED=0`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower would send usage events over the network

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import RESUME_MAY_CHANGE, config_differences, lower_is_better, metric_value
from mmjax.console import ConfigError
from mmjax.evaluation import records
from mmjax.experiment import RESULTS_FILE, Experiment
from mmjax.metrics import tasks as task_metrics
from mmjax.training import checkpoint, federated, parallel
from mmjax.training.state import TrainState

ROUNDS_DIR = "rounds"
HISTORY_FILE = "history.jsonl"
FLOWER_CONFIG = "flower_config.json"  # the config as given, to check a resume against


def _flwr():
    try:
        import flwr
    except ImportError as e:
        raise ConfigError("federated training over Flower needs flwr: pip install -e \".[federated]\"") from e
    return flwr


def _plan(config) -> dict:
    """The federated settings a Flower run supports (FedAvg or FedProx, every site each round)."""
    opts = federated.settings(config)
    if opts["algorithm"] not in ("fedavg", "fedprox"):
        raise ConfigError(f"--config.federated.algorithm={opts['algorithm']!r}: Flower runs fedavg or fedprox "
                          "(centralized and local are the simulation's references)")
    if opts["fraction"] != 1.0:
        raise ConfigError("--config.federated.fraction < 1 is the simulation's; over Flower every site trains each "
                          "round")
    opts["eval_every"] = max(1, config.train.eval_every // opts["local_steps"])
    return opts


def _evaluated(round_index: int, opts: dict) -> bool:
    return round_index % opts["eval_every"] == 0 or round_index == opts["rounds"]


def _score(value: float, metric: str) -> float:
    """Flower's `loss` slot: lower is better."""
    return value if lower_is_better(metric) else 1.0 - value


# ---- A site ------------------------------------------------------------------------------------------------
def make_client(run, workdir: str, site: str):
    """The Flower NumPyClient of `site` (a site name of `run.federated.sites`: a manifest column's value,
    or 'site<k>' of simulated sites), training and evaluating on that site's rows only."""
    flwr = _flwr()

    class SiteClient(flwr.client.NumPyClient):
        def __init__(self):
            self.settings = run
            self.opts = _plan(run)
            _check_resume(run, workdir)
            self.exp = Experiment.from_config(run, workdir)
            self.exp.check()
            self.exp.save()
            self.sites = federated.assign_sites(self.exp, self.opts)
            names, members = federated._training_sites(self.sites, self.opts, self.exp.train_rows)
            if site not in names:
                raise ConfigError(f"--site={site!r}: no training rows at that site; the sites with training rows are "
                                  f"{', '.join(names)}")
            self.name, self.index, self.rows = site, names.index(site), members[names.index(site)]
            self.tx, self.round_fn = federated.local_training(self.exp, self.opts)
            self.initial = self.exp.init_state(jax.random.PRNGKey(run.seed))
            self.treedef = jax.tree.structure(self.initial.params)
            self.state = _stacked(federated.site_state(self.initial, self.tx, self.index))
            self.done, self.loader = 0, None
            if saved_rounds(workdir):
                self._restore(saved_rounds(workdir)[-1])
                print(f"Site {site}: resuming after round {self.done}", flush=True)
            self.predict = parallel.MeshStrategy().predictor(self.exp.eval_step())
            print(f"Site {site}: {len(self.rows)} training rows, {self.opts['rounds']} rounds of "
                  f"{self.opts['local_steps']} local steps", flush=True)

        def _restore(self, round_index: int):
            self.state = jax.tree.unflatten(jax.tree.structure(self.state), load_round(workdir, round_index))
            self.done, self.loader = round_index, None

        def _params(self, parameters):
            return jax.tree.unflatten(self.treedef, [jnp.asarray(p) for p in parameters])

        def get_parameters(self, config):
            return [np.asarray(p) for p in jax.tree.leaves(self.initial.params)]

        def fit(self, parameters, config):
            r = int(config["round"])
            server = {"mu": float(config.get("proximal_mu", 0.0)), "local_steps": int(config["local_steps"]),
                      "rounds": int(config["rounds"])}
            differ = [f"{k} {v} (here {self.opts[k]})" for k, v in server.items() if not np.isclose(v, self.opts[k])]
            if differ:
                raise ConfigError(f"site {self.name}: the server's plan is not this site's config: "
                                  f"{', '.join(differ)} (--config.federated.* and train.num_steps must agree)")
            if r - 1 != self.done:  # a restarted server or client: from this site's state after round r - 1
                if r == 1:
                    self.state, self.done, self.loader = _stacked(federated.site_state(
                        self.initial, self.tx, self.index)), 0, None
                elif r - 1 in saved_rounds(workdir):
                    self._restore(r - 1)
                else:
                    raise ConfigError(f"site {self.name}: the server asks for round {r}, this site has no checkpoint "
                                      f"of round {r - 1} in {workdir} (rounds {saved_rounds(workdir)})")
                drop_rounds_after(workdir, r - 1)  # a later round of this site's is not the server's any more
            if self.loader is None:
                self.loader = federated.site_loaders(self.exp, self.sites, [self.rows], self.opts["local_steps"],
                                                     r - 1, first=self.index)
            batches, _ = federated.round_batches(self.loader, self.opts["local_steps"])
            copy = lambda tree: jax.tree.map(jnp.array, tree)  # the round donates its inputs
            start = TrainState(step=jnp.asarray(r - 1, jnp.int32), params=self._params(parameters), opt_state=(),
                               rng=copy(self.initial.rng), loss_state=copy(self.initial.loss_state))
            new, self.state, metrics = self.round_fn(start, self.state, batches, jnp.ones(1))
            loss = float(np.mean(np.asarray(metrics["loss"])))
            if not np.isfinite(loss):
                raise checkpoint.NonFiniteState(f"site {self.name}: non-finite loss in round {r}")
            self.done = r
            save_round(workdir, r, self.state, keep=3)  # the server may ask for the round before its last
            return [np.asarray(p) for p in jax.tree.leaves(new.params)], len(self.rows), {"loss": loss,
                                                                                        "site": self.name}

        def evaluate(self, parameters, config):
            split, metric = str(config["split"]), self.settings.best_metric
            k = self.sites.names.index(self.name)
            if split not in self.exp.splits or k not in set(self.sites.of_patients(split).values()):
                return 0.0, 0, {"site": self.name, "patients": 0}  # nothing to evaluate here: left out
            collected = federated.collect(self.exp, self.sites, self.predict, split, self._params(parameters), site=k)
            n = len(np.unique(collected[3]))
            out = {"site": self.name, "patients": n}
            if split == "test":
                step = int(config["round"]) * self.opts["local_steps"]  # local steps, as the simulation counts
                rec = records.write(workdir, "test", collected, self.exp.tasks, step, self.settings)
                value = metric_value(rec["metrics"], metric)
                out["results"] = json.dumps(records.plain({key: rec[key] for key in ("metrics", "ci") if key in rec}))
            else:
                value = metric_value(task_metrics.compute_metrics(*collected[:3], self.exp.tasks), metric)
            out[metric] = value
            return _score(value, metric), n, out

    return SiteClient()


def _stacked(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jnp.asarray(x)[None], state)


# ---- Rounds on disk ----------------------------------------------------------------------------------------
def saved_rounds(workdir: str) -> list[int]:
    paths = glob.glob(os.path.join(workdir, ROUNDS_DIR, "round_*.npz"))
    return sorted(int(m.group(1)) for p in paths if (m := re.search(r"round_(\d+)\.npz$", p)))


def _round_path(workdir: str, round_index: int) -> str:
    return os.path.join(workdir, ROUNDS_DIR, f"round_{round_index:04d}.npz")


def load_round(workdir: str, round_index: int) -> list[np.ndarray]:
    """The leaves saved after `round_index` (the server's model, or a site's state), in the tree's order."""
    with np.load(_round_path(workdir, round_index)) as f:
        return [f[f"leaf_{k}"] for k in range(len(f.files))]


def save_round(workdir: str, round_index: int, tree, keep: int = 0) -> None:
    """Writes the leaves of `tree` (a model, or a site's state) after `round_index`, whole or not at all; a
    non-finite tree is refused; `keep` > 0: only the newest `keep` rounds stay."""
    if not bool(checkpoint.all_finite(tree)):
        raise checkpoint.NonFiniteState(f"round {round_index}: the parameters or optimizer state are not finite")
    path = _round_path(workdir, round_index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "wb") as f:
        np.savez(f, **{f"leaf_{k}": np.asarray(a) for k, a in enumerate(jax.tree.leaves(tree))})
    os.replace(path + ".partial", path)
    for old in saved_rounds(workdir)[:-keep] if keep else []:
        os.remove(_round_path(workdir, old))


def drop_rounds_after(workdir: str, round_index: int) -> None:
    for later in saved_rounds(workdir):
        if later > round_index:
            os.remove(_round_path(workdir, later))


def _check_resume(config, workdir: str) -> None:
    """Refuses to resume `workdir`'s rounds under another config (but for what a resume may change: how long,
    how often to evaluate, where the data is), unless `--config.allow_config_change=True`; then records the
    config as given (`FLOWER_CONFIG`)."""
    path = os.path.join(workdir, FLOWER_CONFIG)
    now = config.to_json_best_effort(indent=2)
    if saved_rounds(workdir) and os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        differ = config_differences(before, json.loads(now), RESUME_MAY_CHANGE, new_keys=False)
        if differ and not config.get("allow_config_change", False):
            raise ConfigError(f"{workdir} holds rounds (up to {saved_rounds(workdir)[-1]}) of a run with another "
                              f"config: {', '.join(differ[:8])} differ. Use another --workdir, or "
                              "--config.allow_config_change=True")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(now)


def _history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, HISTORY_FILE)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def resume_round(workdir: str, opts: dict) -> int:
    """The round a restarted server starts after: its last saved model, or the round before when that
    round's evaluation (validation, or the last round's test) was not recorded (it is redone whole)."""
    done = saved_rounds(workdir)
    last = done[-1] if done else 0
    if last and _evaluated(last, opts):
        split = "test" if last == opts["rounds"] else "validation"
        if not any(e["event"] == split and e["round"] == last for e in _history(workdir)) or (
                split == "test" and not os.path.exists(os.path.join(workdir, RESULTS_FILE))):
            return last - 1
    return last


# ---- The server --------------------------------------------------------------------------------------------
def make_strategy(config, workdir: str, num_sites: int, first_round: int = 0, initial=None):
    """Flower's FedAvg (or FedProx with `federated.mu`) over all `num_sites` each round, saving every round's
    model and writing the sites' metrics; a site's failure, a missing or doubled site stops the run (nothing is
    averaged away). Rounds are numbered from `first_round` + 1 (a resumed server)."""
    flwr = _flwr()
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx

    opts, metric = _plan(config), config.best_metric
    base = FedProx if opts["algorithm"] == "fedprox" else FedAvg
    absolute = lambda server_round: first_round + server_round
    split_of = lambda r: "test" if r == opts["rounds"] else "validation"

    def log(event: dict) -> None:
        with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
            f.write(json.dumps(records.plain(event), allow_nan=False) + "\n")

    class Strategy(base):
        def _check(self, what: str, server_round: int, results, failures) -> list:
            """The results in site order, after checking that every site answered once."""
            r = absolute(server_round)
            if failures:
                first = failures[0] if isinstance(failures[0], BaseException) else failures[0][1].status
                raise RuntimeError(f"round {r}: {len(failures)} site(s) failed to {what}: {first}")
            names = [res.metrics["site"] for _, res in results]
            if len(set(names)) != len(names) or len(names) != num_sites:
                raise RuntimeError(f"round {r}: {num_sites} sites expected to {what}, answered: {sorted(names)}")
            return sorted(results, key=lambda item: item[1].metrics["site"])  # the average's order: fixed

        def _wait_for_every_site(self, client_manager) -> None:
            client_manager.wait_for(num_sites)  # Flower would sample a subset of more, or wait for fewer
            if client_manager.num_available() != num_sites:
                raise RuntimeError(f"{client_manager.num_available()} sites connected, {num_sites} expected")

        def configure_fit(self, server_round, parameters, client_manager):
            self._wait_for_every_site(client_manager)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            results = self._check("train", server_round, results, failures)
            aggregated, _ = super().aggregate_fit(server_round, results, failures)
            r = absolute(server_round)
            save_round(workdir, r, parameters_to_ndarrays(aggregated))
            rows = {res.metrics["site"]: res.num_examples for _, res in results}
            loss = {res.metrics["site"]: res.metrics["loss"] for _, res in results}
            mean = sum(loss[s] * rows[s] for s in rows) / sum(rows.values())
            log({"event": "train", "round": r, "loss": mean, "site_loss": loss, "training_rows": rows})
            print(f"round {r}/{opts['rounds']}: loss {mean:.4f} ({len(results)} sites)", flush=True)
            return aggregated, {"loss": mean}

        def configure_evaluate(self, server_round, parameters, client_manager):
            if not _evaluated(absolute(server_round), opts):
                return []
            self._wait_for_every_site(client_manager)
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            results = self._check("evaluate", server_round, results, failures)
            r, split = absolute(server_round), split_of(absolute(server_round))
            per_site = {res.metrics["site"]: res for _, res in results if res.num_examples > 0}
            # a site's undefined metric (one class in its rows: AUROC NaN) is left out of the mean, and shown
            scored = [res for res in per_site.values() if np.isfinite(res.metrics[metric])]
            n = sum(res.num_examples for res in scored)
            mean = sum(res.metrics[metric] * res.num_examples for res in scored) / n if n else float("nan")
            by_site = {s: {metric: res.metrics[metric], "patients": res.num_examples} for s, res in per_site.items()}
            shown = ", ".join(f"{s} {v[metric]:.4f}" for s, v in sorted(by_site.items())) or "no site has rows"
            print(f"round {r}: {split} {metric} {mean:.4f} (mean of the sites by patients: {shown})", flush=True)
            if split == "test":
                sites = {s: {"patients": res.num_examples, **json.loads(res.metrics["results"])}
                         for s, res in sorted(per_site.items())}
                info = {**{k: opts[k] for k in ("algorithm", "local_steps", "mu", "rounds")},
                        "engine": f"flwr {flwr.__version__}", "num_sites": num_sites, "evaluated_round": r}
                out = {"test": {metric: mean, "weighting": "mean of the sites' metric weighted by test patients"},
                       "sites": sites, "run": {"federated": info}}
                records.dump_json(out, os.path.join(workdir, RESULTS_FILE))
            log({"event": split, "round": r, metric: mean, "sites": by_site})  # last: the round's evaluation is done
            return (_score(mean, metric) if n else None), {metric: mean}

    kwargs = {"proximal_mu": opts["mu"]} if base is FedProx else {}
    return Strategy(fit_metrics_aggregation_fn=lambda metrics: {},  # aggregate_fit writes them
                    fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=num_sites,
                    min_evaluate_clients=num_sites, min_available_clients=num_sites, accept_failures=False,
                    initial_parameters=None if initial is None else ndarrays_to_parameters(initial),
                    on_fit_config_fn=lambda server_round: {"round": absolute(server_round), "rounds": opts["rounds"],
                                                           "local_steps": opts["local_steps"]},
                    on_evaluate_config_fn=lambda server_round: {"round": absolute(server_round),
                                                                "split": split_of(absolute(server_round))},
                    **kwargs)


def serve(config, workdir: str, address: str, num_sites: int | None = None) -> dict:
    """Runs the Flower server until the last round (resuming `workdir`: `resume_round`); returns the test
    results the sites sent. An error leaves Flower's gRPC server running (its sites waiting): the command
    line ends the process."""
    flwr = _flwr()
    opts = _plan(config)
    if num_sites is None:
        if not opts["sites"].isdigit():
            raise ConfigError(f"--config.federated.sites={opts['sites']!r} is a column: give --num_sites, the number "
                              "of sites that will connect")
        num_sites = int(opts["sites"])
    _check_resume(config, workdir)
    done = saved_rounds(workdir)
    if done and done[-1] > opts["rounds"]:
        raise ConfigError(f"{workdir} has {done[-1]} rounds, more than the {opts['rounds']} of train.num_steps / "
                          "federated.local_steps: use another --workdir")
    first = resume_round(workdir, opts)
    if first >= opts["rounds"]:
        print(f"{workdir} has every round ({first}) and its results; nothing to do", flush=True)
    else:
        if first:
            print(f"Resuming after round {first} in {workdir}", flush=True)
        drop_rounds_after(workdir, first)
        kept = [e for e in _history(workdir) if e["round"] <= first]  # a redone round's lines are written anew
        with open(os.path.join(workdir, HISTORY_FILE), "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        strategy = make_strategy(config, workdir, num_sites, first, load_round(workdir, first) if first else None)
        print(f"Flower server on {address}: {opts['algorithm']}, {opts['rounds'] - first} rounds of "
              f"{opts['local_steps']} local steps, waiting for {num_sites} sites", flush=True)
        flwr.server.start_server(server_address=address, strategy=strategy,
                                 config=flwr.server.ServerConfig(num_rounds=opts["rounds"] - first))
    path = os.path.join(workdir, RESULTS_FILE)
    return json.load(open(path)) if os.path.exists(path) else {}


def connect(config, workdir: str, address: str, site: str, max_wait_s: float | None = None) -> None:
    """Runs `site`'s client until the server ends the run."""
    flwr = _flwr()
    client = make_client(config, workdir, site)
    _wait_for_server(address, max_wait_s)
    flwr.client.start_client(server_address=address, client=client.to_client(), max_wait_time=max_wait_s)


def _wait_for_server(address: str, max_wait_s: float | None) -> None:
    """Blocks until `address` accepts connections: Flower's gRPC stream fails at once (UNAVAILABLE) rather than
    retrying when the server is not listening yet."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    start, delay = time.monotonic(), 0.1
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            waited = time.monotonic() - start
            if max_wait_s is not None and waited > max_wait_s:
                raise ConnectionError(f"no Flower server at {address} after {waited:.0f} s: {e}") from e
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import logging

    logging.getLogger("flwr").propagate = False  # Flower prints its own lines; not twice through absl's handler
    f = _FLAGS
    if f["role"].value == "server":
        try:
            serve(f["config"].value, f["workdir"].value, f["address"].value, f["num_sites"].value)
        except ConfigError:
            raise  # one line (console.run); nothing of Flower's is running yet
        except Exception:  # noqa: BLE001 - printed; os._exit, since Flower's gRPC threads would keep it alive
            import traceback

            traceback.print_exc()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)
    else:
        if not f["site"].value:
            raise app.UsageError("--role=client needs --site, the site's name")
        connect(f["config"].value, f["workdir"].value, f["address"].value, f["site"].value)


if __name__ == "__main__":
    from absl import flags

    from mmjax.console import define_config_flag, run

    _default = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "synthetic_patients.py")
    _FLAGS = {"config": define_config_flag("config", os.path.normpath(_default), "Experiment config file."),
              "role": flags.DEFINE_enum("role", "client", ["server", "client"], "This process's part."),
              "address": flags.DEFINE_string("address", "127.0.0.1:8080", "The server's host:port."),
              "workdir": flags.DEFINE_string("workdir", "workdirs/flower", "Where this process's files go."),
              "site": flags.DEFINE_string("site", "", "client: the site's name (a value of the sites column, or "
                                          "site<k> for a count of simulated sites)."),
              "num_sites": flags.DEFINE_integer("num_sites", None, "server: how many sites connect (default: "
                                                "federated.sites when it is a count).")}
    run(main)
