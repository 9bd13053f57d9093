"""Federated learning across sites without pooling patients: FedAvg (McMahan et al., 2017) and FedProx
(Li et al., 2020), simulated in one program.

    python launch.py --config.federated.sites=4 --workdir=workdirs/fedavg                   # simulated sites
    python launch.py --config=experiments/manifest.py ... --config.federated.sites=hospital   # a manifest column
    python launch.py --config.federated.sites=4 --config.federated.algorithm=fedprox --config.federated.mu=0.01

`--config.federated.*` (experiments/common.py):
- `sites`: a manifest column (each value a site; its validation and test rows too), or a count S of
  simulated sites: every split's rows are dealt to the sites with label skew (per class of the first
  classification output, site proportions drawn from Dirichlet(`label_skew`): small is skewed) and
  modality-availability skew (`absent`: 'auto' is '0:signal' for simulated sites, site 0 has no ECGs,
  in every split, and nothing for a column's; or e.g. '1:image+text'): those rows' modality is marked
  absent, which the model excludes exactly.
- `algorithm`: 'fedavg'; 'fedprox' (the local loss plus mu/2 ||w - w_round||^2, as a gradient term
  mu (w - w_round) before the optimizer); 'centralized' (one site holding every training row: the
  pooled reference, the same data); 'local' (`only_site` alone: what a site gets by itself).
- A round: each of a `fraction` of the sites (at least one, drawn per round from the seed) takes
  `local_steps` steps of the experiment's train step from the round's model on batches of its own
  rows only, with its own optimizer state (kept between rounds); the new model is the average of the
  participants' parameters weighted by their training rows. The sites are vmapped and the local
  steps scanned: a round is one compiled program, not a Python loop over sites.
- `train.num_steps` counts local steps: `num_steps / local_steps` rounds. A checkpoint is written at
  the end of every `train.checkpoint_every / local_steps` rounds with the round's model as its
  `params` (so `--mode=evaluate`, the report and predict read it as any run's) and every site's
  state; an interrupted run resumes at the start of the round after its last checkpoint and ends with
  the parameters an uninterrupted run has (tested).

Only parameters leave a site in the simulation: a site's local steps read batches of its own rows
(tested), and the server sees their trained parameters. The validation and test rows of every site
evaluate the round's model; `results.json` has the test metrics over all sites and per site, with
intervals and the gap's permutation test (`mmjax/evaluation/subgroups.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.config import lower_is_better, metric_value, parse_list
from mmjax.console import ConfigError
from mmjax.data.pipeline import CheckedSource
from mmjax.evaluation import records, subgroups
from mmjax.evaluation.predictor import Predictor
from mmjax.evaluation.robustness import hide
from mmjax.experiment import CHECKPOINTS, RESULTS_FILE, Experiment
from mmjax.metrics import tasks as task_metrics
from mmjax.training import checkpoint, parallel
from mmjax.training.metric_writer import MetricWriter
from mmjax.training.state import TrainState
from mmjax.training.step import make_train_step

ALGORITHMS = ("fedavg", "fedprox", "centralized", "local")


def enabled(config) -> bool:
    return bool((config.get("federated", None) or {}).get("sites", ""))


@dataclasses.dataclass(frozen=True)
class Sites:
    """Which site each record of a split belongs to."""
    names: tuple[str, ...]
    of_split: dict  # split -> [N] site index of each record (in the split's order)
    ids: dict  # split -> [N] patient ids
    absent: dict  # site index -> modalities it lacks

    def of_patients(self, split: str) -> dict:
        """{patient id: the site of the patient's first record}."""
        out = {}
        for p, k in zip(self.ids[split].tolist(), self.of_split[split].tolist()):
            out.setdefault(p, k)
        return out


def settings(config) -> dict:
    f = config.federated
    algorithm = str(f.get("algorithm", "fedavg"))
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--config.federated.algorithm={algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    local = int(f.get("local_steps", 10))
    if local < 1 or config.train.num_steps % local:
        raise ConfigError(f"--config.train.num_steps={config.train.num_steps} must be a multiple of "
                          f"--config.federated.local_steps={local} (>= 1): the local steps of all the rounds")
    fraction = float(f.get("fraction", 1.0))
    if not 0 < fraction <= 1:
        raise ConfigError(f"--config.federated.fraction={fraction}: a fraction of the sites in (0, 1]")
    if config.get("init_from", ""):
        raise ConfigError("--config.init_from with federated training is not supported yet")
    if config.get("privacy", {}).get("dp", False):
        raise ConfigError("--config.privacy.dp=True with federated training (DP-FedAvg) is not supported yet")
    return {"sites": str(f.sites), "algorithm": algorithm, "local_steps": local, "fraction": fraction,
            "mu": float(f.get("mu", 0.01)) if algorithm == "fedprox" else 0.0,
            "label_skew": float(f.get("label_skew", 0.5)), "absent": str(f.get("absent", "auto")),
            "only_site": str(f.get("only_site", "")), "rounds": config.train.num_steps // local}


# ---- Sites ------------------------------------------------------------------------------------------------
def _id_and_label(record: dict, tasks) -> tuple[str, int]:
    """A record's patient id and class of the first classification output (a multilabel task's first
    label; -1: unknown; 0 without a classification task)."""
    pid = subgroups.text(record["patient_id"])
    task = next((t for t in tasks if t.kind != "regression"), None)
    if task is None:
        return pid, 0
    y = np.ravel(np.asarray(record["labels"][task.name]))
    known = np.ravel(np.asarray(record.get("label_known", {}).get(task.name, True)))
    return pid, int(y[0]) if bool(known[0]) else -1


def assign_sites(exp: Experiment, opts: dict) -> Sites:
    """Every split's records dealt to sites: by the manifest column `opts['sites']`, or, for a count,
    simulated with label skew and the `absent` modalities."""
    splits = [s for s in ("train", "validation", "test") if s in exp.splits]
    count = opts["sites"]
    if not count.isdigit():
        ids, cells, every = {}, {}, set()
        options = {**subgroups.settings(exp.config), "groups": [count]}
        for split in splits:
            ids[split], columns = subgroups.attributes(exp, split, options)
            cells[split] = columns[count]
            every |= set(cells[split].tolist())
        names = tuple(sorted(every))
        index = {n: k for k, n in enumerate(names)}
        of = {split: np.array([index[c] for c in cells[split]]) for split in splits}
        found = Sites(names, of, ids, {})
        spanning = {p for split in splits for first in [found.of_patients(split)]
                    for p, k in zip(ids[split].tolist(), of[split].tolist()) if first[p] != k}
        if spanning:
            print(f"Warning: {len(spanning)} patient(s) have rows at several sites ({count}); each is counted at the "
                  "site of its first row when rows are matched by patient (absent modalities, per-site results)",
                  flush=True)
        absent = _parse_absent("" if opts["absent"] == "auto" else opts["absent"], names, exp)
        return Sites(names, of, ids, absent)
    num = int(count)
    if num < 1:
        raise ConfigError("--config.federated.sites must be a manifest column or a count >= 1")
    names = tuple(f"site{k}" for k in range(num))
    rng = np.random.default_rng(exp.config.seed)
    proportions = {}
    of, ids = {}, {}
    for j, split in enumerate(splits):
        source = CheckedSource(exp.builder, split)
        fields = [_id_and_label(source[i], exp.tasks) for i in range(len(source))]  # not the images: memory
        ids[split] = np.array([f[0] for f in fields])
        # a patient's records go to one site together, by the first record's label
        patients, first, inverse = np.unique(ids[split], return_index=True, return_inverse=True)
        labels = np.array([fields[i][1] for i in first], int)
        draw = np.random.default_rng([exp.config.seed, j])
        sites = np.zeros(len(patients), int)
        for c in sorted(set(labels.tolist())):
            if c not in proportions:
                proportions[c] = rng.dirichlet(np.full(num, opts["label_skew"]))
            members = np.flatnonzero(labels == c)
            sites[members] = draw.choice(num, size=len(members), p=proportions[c])
        of[split] = sites[inverse.ravel()]
    auto = "0:signal" if num > 1 and "signal" in exp.modalities else ""
    absent = _parse_absent(auto if opts["absent"] == "auto" else opts["absent"], names, exp)
    return Sites(names, of, ids, absent)


def _parse_absent(text: str, names: tuple, exp: Experiment) -> dict:
    """'0:signal,2:image+text' -> {0: ('signal',), 2: ('image', 'text')} (sites by index or name)."""
    out = {}
    for item in parse_list(text):
        site, _, mods = item.partition(":")
        k = names.index(site) if site in names else (int(site) if site.isdigit() else -1)
        if not 0 <= k < len(names):
            raise ConfigError(f"--config.federated.absent={text!r}: no site {site!r} among {', '.join(names)}")
        wanted = tuple(m for m in mods.split("+") if m)
        unknown = [m for m in wanted if m not in exp.modalities]
        if unknown:
            raise ConfigError(f"--config.federated.absent={text!r}: the run has no modality {unknown[0]!r}")
        out[k] = wanted
    return out


def hide_absent(batch: dict, site_of: dict, absent: dict) -> dict:
    """The batch with each row's site's absent modalities marked absent (rows by patient id)."""
    if not absent:
        return batch
    sites = np.array([site_of.get(str(i), -1) for i in np.asarray(batch["patient_id"])])
    for k, mods in absent.items():
        batch = hide(batch, [m for m in mods if m in batch], rows=sites == k)
    return batch


# ---- Rounds ------------------------------------------------------------------------------------------------
class ProxState(NamedTuple):
    anchor: Any  # the round's model


def proximal(mu: float) -> optax.GradientTransformation:
    """FedProx's term: the gradient of mu/2 ||w - anchor||^2 added to the local gradient."""
    return optax.GradientTransformation(
        lambda params: ProxState(params),
        lambda updates, state, params: (jax.tree.map(lambda g, w, a: g + mu * (w - a), updates, params,
                                                     state.anchor), state))


def aggregate(params, weights):
    """The average of the sites' stacked parameters ([S, ...] leaves) weighted by `weights` [S]."""
    w = weights / jnp.sum(weights)
    return jax.tree.map(lambda p: jnp.tensordot(w.astype(p.dtype), p, axes=1), params)


def make_round(train_step, prox: bool):
    """round(global TrainState, sites (stacked TrainState), batches [S, L, B, ...], weights [S]) -> (global,
    sites, metrics [S, L]): every site's local steps from the round's model (vmapped over sites, scanned over
    steps), then the weighted average of the sites with weight > 0; the others keep their state."""

    def local(site, batches, params):
        opt_state = (ProxState(params), site.opt_state[1]) if prox else site.opt_state
        return jax.lax.scan(train_step, site.replace(params=params, opt_state=opt_state), batches)

    def round_fn(state: TrainState, sites: TrainState, batches, weights):
        trained, metrics = jax.vmap(local, in_axes=(0, 0, None))(sites, batches, state.params)
        taking = weights > 0
        keep = lambda new, old: jnp.where(taking.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        sites = jax.tree.map(keep, trained, sites)
        # a site that does not take part trained too (one program), on garbage if it diverged: out of the sum
        params = aggregate(jax.tree.map(lambda p: jnp.where(taking.reshape((-1,) + (1,) * (p.ndim - 1)), p, 0),
                                        trained.params), weights)
        return state.replace(step=state.step + 1, params=params), sites, metrics

    return jax.jit(round_fn, donate_argnums=(0, 1))


def participants(num_sites: int, fraction: float, seed: int, round_index: int) -> np.ndarray:
    """The sites (sorted indices) that train in round `round_index`: max(1, round(fraction * S)) drawn
    without replacement from (seed, round)."""
    m = max(1, int(round(fraction * num_sites)))
    return np.sort(np.random.default_rng([seed, 0xFED, round_index]).choice(num_sites, m, replace=False))


@dataclasses.dataclass
class Federation:
    exp: Experiment
    opts: dict
    sites: Sites
    trained: list  # the names of the sites that train
    members: list  # per training site: the indices of its training records
    state: TrainState
    site_states: TrainState
    round_fn: Any
    manager: Any
    writer: MetricWriter
    start_round: int
    predict: Any


def _training_sites(sites: Sites, opts: dict, train_rows) -> tuple[list[str], list[np.ndarray]]:
    """(names, record indices) of the sites that train: every site, the one `only_site`, or one holding all."""
    of = sites.of_split["train"]
    pool = np.arange(len(of)) if train_rows is None else np.asarray(train_rows)
    if opts["algorithm"] == "centralized":
        return ["all sites"], [pool]
    names = list(sites.names)
    members = [pool[of[pool] == k] for k in range(len(names))]
    training = [n for n, m in zip(names, members) if len(m)]
    if opts["algorithm"] == "local":
        if opts["only_site"] not in training:
            raise ConfigError(f"--config.federated.algorithm=local needs --config.federated.only_site, a site with "
                              f"training rows: one of {', '.join(training)}")
        k = names.index(opts["only_site"])
        return [names[k]], [members[k]]
    if not training:
        raise ConfigError("no site has training rows")
    # a site with no training rows (e.g. an external test site) is evaluated, not trained on
    return training, [m for m in members if len(m)]


def site_loaders(exp: Experiment, sites: Sites, members, local_steps: int, start_round: int, first: int = 0):
    """Per training site (`members`: its training records; the k-th site, counted from `first`, seeded seed + k),
    an iterator of its batches (its own rows only), from round `start_round` on."""
    c = exp.config
    site_of = sites.of_patients("train")
    out = []
    for k, rows in enumerate(members, start=first):
        loader = exp.train_loader(c.train.batch_size, seed=c.seed + k, rows=rows,
                                  start_batch=start_round * local_steps, sampled=False, shard_index=0, shard_count=1)
        out.append(map(lambda b: hide_absent(b, site_of, sites.absent), iter(loader)))
    return out


def round_batches(loaders, local_steps: int) -> tuple[dict, list]:
    """The next round's host batches of every site, stacked [S, L, B, ...], and their patient ids."""
    per_site = [[next(it) for _ in range(local_steps)] for it in loaders]
    ids = [[b["patient_id"] for b in site] for site in per_site]
    stack = lambda *xs: np.stack(xs)
    batches = [jax.tree.map(stack, *[parallel.device_batch(b) for b in site]) for site in per_site]
    return jax.tree.map(stack, *batches), ids


def local_training(exp: Experiment, opts: dict) -> tuple[optax.GradientTransformation, Any]:
    """(a site's optimizer, the jitted round of `make_round`): the experiment's train step, with FedProx's
    term before the optimizer for 'fedprox'."""
    prox = opts["algorithm"] == "fedprox"
    tx = optax.chain(proximal(opts["mu"]), exp.optimizer) if prox else exp.optimizer
    return tx, make_round(make_train_step(exp.model, tx, exp.tasks, exp.loss_weights, **exp.loss_settings), prox)


def site_state(state: TrainState, tx, k: int) -> TrainState:
    """The k-th training site's state before the first round: the initial model, its own optimizer state and
    dropout key (the run's for site 0, folded with k for the others)."""
    rng = state.rng if k == 0 else jax.random.fold_in(state.rng, k)
    return TrainState(step=state.step, params=state.params, opt_state=tx.init(state.params), rng=rng,
                      loss_state=state.loss_state)


def init_or_restore(config, workdir: str) -> Federation:
    from mmjax.training.train import check_resume

    opts = settings(config)
    check_resume(config, workdir)
    exp = Experiment.from_config(config, workdir)
    exp.check()
    os.makedirs(workdir, exist_ok=True)
    exp.save()
    sites = assign_sites(exp, opts)
    names, members = _training_sites(sites, opts, exp.train_rows)
    tx, round_fn = local_training(exp, opts)
    state = exp.init_state(jax.random.PRNGKey(config.seed))
    site_states = jax.tree.map(lambda *xs: jnp.stack(xs), *[site_state(state, tx, k) for k in range(len(members))])
    every = max(1, config.train.checkpoint_every // opts["local_steps"])
    manager = checkpoint.make_manager(exp.path(CHECKPOINTS), every, config.train.keep_checkpoints, config.best_metric,
                                      lower_is_better=lower_is_better(config.best_metric))
    start = 0
    whole = state.replace(opt_state=site_states, step=jnp.zeros((), jnp.int32))
    if manager.latest_step() is not None:
        whole, _ = checkpoint.restore(manager, parallel.abstract_state(whole))
        start = int(whole.step)
        print(f"Resuming from round {start} in {workdir}", flush=True)
    state, site_states = whole.replace(opt_state=()), whole.opt_state
    rows = ", ".join(f"{n} {len(m)}" for n, m in zip(names, members))
    lacks = "; ".join(f"{sites.names[k]} has no {'/'.join(m)}" for k, m in sites.absent.items())
    print(f"Federated {opts['algorithm']}: {len(names)} training site(s) ({rows} training rows)"
          f"{'; ' + lacks if lacks else ''}; {opts['rounds']} rounds of {opts['local_steps']} local steps, "
          f"{max(1, round(opts['fraction'] * len(names)))} site(s) a round", flush=True)
    # progress lines count rounds: "steps/s" are rounds/s, "examples" every site's rows of a round
    writer = MetricWriter(workdir, opts["rounds"], config.train.batch_size * opts["local_steps"] * len(members),
                          resume_step=start)
    predict = parallel.MeshStrategy().predictor(exp.eval_step())
    return Federation(exp, opts, sites, names, members, state, site_states, round_fn, manager, writer, start,
                      predict)


def evaluate_split(fed: Federation, split: str, params) -> tuple:
    """(metrics, collected) of `params` on `split`, each site's absent modalities hidden in its rows."""
    collected = collect(fed.exp, fed.sites, fed.predict, split, params)
    return task_metrics.compute_metrics(*collected[:3], fed.exp.tasks), collected


def collect(exp: Experiment, sites: Sites, predict, split: str, params, site: int | None = None) -> tuple:
    """(preds, labels, masks, ids) of `params` on `split` (only `site`'s rows, if given), each site's absent
    modalities hidden in its rows."""
    site_of = sites.of_patients(split)
    predictor = Predictor(exp, params, 0, predict=predict)
    collected = predictor.collect(exp.eval_batches(split), transform=lambda b: hide_absent(b, site_of, sites.absent))
    if site is None:
        return collected
    mine = np.array([site_of.get(str(i), -1) == site for i in collected[3]], bool)
    if not mine.any():
        raise ConfigError(f"site {sites.names[site]}: no rows in the {split} split")
    return subgroups.subset(collected, mine)


def fit(fed: Federation) -> dict:
    c, opts = fed.exp.config, fed.opts
    rounds, L = opts["rounds"], opts["local_steps"]
    stop = (c.train.stop_at_step or c.train.num_steps) // L
    every_eval = max(1, c.train.eval_every // L)
    weights_all = np.array([len(m) for m in fed.members], np.float32)
    loaders = site_loaders(fed.exp, fed.sites, fed.members, L, fed.start_round)
    r, validation, started = fed.start_round, None, time.perf_counter()
    while r < min(rounds, stop):
        batches, _ = round_batches(loaders, L)
        taking = participants(len(fed.members), opts["fraction"], c.seed, r)
        weights = np.zeros_like(weights_all)
        weights[taking] = weights_all[taking]
        fed.state, fed.site_states, metrics = fed.round_fn(fed.state, fed.site_states, batches, jnp.asarray(weights))
        r += 1
        site_loss = np.mean(np.asarray(metrics["loss"]), 1)  # a non-participant's (even NaN) is not counted
        loss = float(site_loss[taking] @ weights[taking] / weights[taking].sum())
        if not np.isfinite(loss):
            raise checkpoint.NonFiniteState(f"non-finite loss in round {r}: stopping the run "
                                            f"({checkpoint.resume_point(fed.manager)})")
        if r % max(1, c.train.log_every // L) == 0 or r == rounds:
            fed.writer.progress(r, loss)
        fed.writer.write("train", r, {"loss": loss, "participants": ",".join(fed.trained[k] for k in taking),
                                      "site_loss": {fed.trained[k]: float(site_loss[k]) for k in taking}})
        val = None
        if "validation" in fed.exp.splits and (r % every_eval == 0 or r == rounds):
            val, collected = evaluate_split(fed, "validation", fed.state.params)
            validation = (r, val, collected)
            fed.writer.write("validation", r, val)
            print(f"round {r}/{rounds}: loss {loss:.4f}, validation {c.best_metric} "
                  f"{metric_value(val, c.best_metric):.4f}", flush=True)
            fed.writer.reset_clock(r)  # an evaluation is not a round
        last = r in (rounds, stop)
        metric = {c.best_metric: metric_value(val, c.best_metric)} if val else None
        checkpoint.save(fed.manager, r, fed.state.replace(opt_state=fed.site_states),
                        {"round": r, "local_steps": L, "seed": c.seed}, metric, force=last)
    fed.manager.wait_until_finished()
    return {"round": r, "validation": validation, "wall_seconds": time.perf_counter() - started}


def finish(fed: Federation, loop: dict) -> dict:
    """The best round's model by validation on every site's test rows, overall and per site."""
    c, exp = fed.exp.config, fed.exp
    params, best = fed.state.params, loop["round"]
    if "validation" in exp.splits:
        ranked = fed.manager.best_step()
        if ranked not in (None, best):
            whole = checkpoint.restore(fed.manager, parallel.abstract_state(fed.state.replace(
                opt_state=fed.site_states)), ranked)[0]
            params, best = whole.params, ranked
    results, collected = {}, {}
    for split in ("validation", "test"):
        if split in exp.splits:
            results[split], collected[split] = evaluate_split(fed, split, params)
    by_site = None
    if "test" in results:
        records.write(exp.workdir, "test", collected["test"], exp.tasks, best, c, reference=collected.get("validation"))
        site_of = fed.sites.of_patients("test")
        names = np.array([fed.sites.names[site_of[str(i)]] for i in collected["test"][3]])
        by_site = subgroups.analyze_variable(collected["test"], exp.tasks, names, subgroups.settings(c))
        print(f"Test {c.best_metric}: {metric_value(results['test'], c.best_metric):.4f}; per site:\n"
              + subgroups.format_table({"variables": {"site": by_site}}), flush=True)
    info = {"algorithm": fed.opts["algorithm"], "rounds": loop["round"], "evaluated_round": int(best),
            "local_steps": fed.opts["local_steps"], "fraction": fed.opts["fraction"], "mu": fed.opts["mu"],
            "sites": list(fed.sites.names),
            "training_rows": dict(zip(fed.trained, map(len, fed.members))),
            "absent": {fed.sites.names[k]: list(m) for k, m in fed.sites.absent.items()},
            "wall_seconds": round(loop["wall_seconds"], 2)}
    out = {**results, "run": {"federated": info, "evaluated_step": int(best)}, "sites": by_site}
    records.dump_json(out, exp.path(RESULTS_FILE))
    return out


def train_federated(config, workdir: str) -> dict:
    """Federated training of `config` in `workdir` (resuming it) and its evaluation; {'stopped_at_step': N}
    when `train.stop_at_step` stopped it."""
    fed = init_or_restore(config, workdir)
    try:
        loop = fit(fed)
        if loop["round"] < fed.opts["rounds"]:
            return {"stopped_at_step": loop["round"] * fed.opts["local_steps"]}
        return finish(fed, loop)
    finally:
        fed.writer.close()
        fed.manager.close()
