r"""Self-supervised pretraining of the encoders, then a warm start of the supervised run.

    python launch.py --mode=pretrain --config=experiments/pneumoniamnist.py --workdir=P
    python launch.py --config=experiments/pneumoniamnist.py --config.init_from=P --workdir=W

`--mode=pretrain` trains every encoder of the experiment's model on the training split's rows, with
or without labels (labels are never read), on two objectives:

- **masked modelling per modality**: a random `pretrain.mask_ratio` of each example's token regions
  is hidden in the input (image patches and signal segments zeroed, which after the pipeline's
  standardization is the mean; text tokens replaced by `[UNK]` at `pretrain.text_mask_ratio`) and a
  linear head on the encoder's token reconstructs what was hidden: standardized pixels or samples
  (mean squared error, MAE of He et al. 2022 without its decoder) or the word piece (cross-entropy,
  BERT's masked language modelling). A token's region is the part of the input it covers, from the
  encoder's `token_stride` checked against its token count: a ViT's patches, a signal encoder's
  patches or total stride (the last one padded), a text encoder's word pieces. An encoder without a
  stride (a 2-D ResNet, an RNN), and tabular encoders, learn from the contrastive objective alone.
- **cross-modal contrastive** (CLIP, Radford et al. 2021): each encoder's pooled tokens, projected and
  normalized, should pick the same patient's other modalities out of the batch (InfoNCE over every
  pair of modalities, both directions, temperature `pretrain.temperature`); a patient without one of
  the pair's modalities is in neither the rows nor the columns of that pair's logits.

Checkpoints (every `pretrain.checkpoint_every` steps) hold the encoders and the heads; an interrupted
pretraining resumes from its latest. `P/pretrain.json` records the encoders, the objectives and the
validation objective at the end. A supervised run with `--config.init_from=P` (no `init_params`)
loads every encoder the two models share and starts the fusion and heads from scratch; the encoders'
settings must be the same (the same experiment file and model flags).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.config import RESUME_MAY_CHANGE, config_differences
from mmjax.console import ConfigError
from mmjax.data.tokenizer import PAD, UNK
from mmjax.experiment import CHECKPOINTS, CONFIG_FILE, RESOLVED, Experiment, resolved_differences
from mmjax.models.layers import Dense, Dtype
from mmjax.models.model import encoder_class
from mmjax.training import checkpoint, parallel
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import TrainState
from mmjax.training.step import tree_norm

PRETRAIN_FILE = "pretrain.json"
MAY_CHANGE = ("num_steps", "log_every", "checkpoint_every")  # a finished pretraining continues with more steps
UNK_ID = UNK  # the masked word pieces' input
_FIRST_WORD_ID = max(PAD, UNK) + 1  # [PAD] and [UNK] are never a masked-modelling target


def settings(config) -> dict:
    """`config.pretrain` with its defaults (a config made before pretraining existed has none)."""
    p = dict(num_steps=1000, batch_size=0, mask_ratio=0.5, text_mask_ratio=0.15, masked_weight=1.0,
             contrastive_weight=1.0, temperature=0.1, projection_dim=128, log_every=50, checkpoint_every=250)
    given = dict(config.get("pretrain", None) or {})
    unknown = sorted(set(given) - set(p))
    if unknown:
        raise ValueError(f"config.pretrain: unknown setting(s) {unknown}; known: {sorted(p)}")
    p.update(given)
    p["batch_size"] = int(p["batch_size"] or config.train.batch_size)
    if p["batch_size"] % jax.device_count() or p["batch_size"] % jax.process_count():
        raise ValueError(f"pretrain.batch_size={p['batch_size']} must be divisible by the {jax.device_count()} "
                         f"devices and the {jax.process_count()} processes")
    if not 0 < p["mask_ratio"] < 1 or not 0 < p["text_mask_ratio"] < 1:
        raise ValueError("pretrain.mask_ratio and pretrain.text_mask_ratio must be in (0, 1)")
    if p["temperature"] <= 0:
        raise ValueError(f"pretrain.temperature={p['temperature']} must be > 0")
    return p


# ---- What each encoder can reconstruct --------------------------------------------------------------
def objectives(exp: Experiment, template: dict) -> dict:
    """{modality: its masked-modelling target} for the encoders whose tokens tile the input
    (`token_stride`, checked against the token count the encoder gives on this input): ('image', (rows,
    cols) of a token's pixels), ('signal', steps per token), ('text', vocabulary size); None for the
    rest (contrastive only)."""
    model = exp.model
    out = {}
    for m in model.modalities:
        cls, kwargs = encoder_class(model.encoders[m])
        encoder = cls(width=model.width, dtype=model.dtype, **kwargs)
        inputs = template[m]
        tokens, _ = jax.eval_shape(lambda x, e=encoder: e.init_with_output(jax.random.PRNGKey(0), x)[0], inputs)
        n, shape, stride = tokens.shape[1], inputs["values"].shape, encoder.token_stride()
        out[m] = None
        if stride is None:
            continue
        if cls.kind == "image" and shape[1] % stride[0] == 0 and shape[2] % stride[1] == 0 \
                and (shape[1] // stride[0]) * (shape[2] // stride[1]) == n:
            out[m] = ("image", tuple(stride))
        elif cls.kind == "signal" and -(-shape[1] // stride) == n:
            out[m] = ("signal", int(stride))
        elif cls.kind == "text" and n == shape[1] and "vocab_size" in kwargs:
            out[m] = ("text", int(kwargs["vocab_size"]))
    return out


def _target_width(objective, channels: int) -> int:
    kind, unit = objective
    if kind == "image":
        return unit[0] * unit[1] * channels
    if kind == "signal":
        return unit * channels
    return unit  # text: the vocabulary


class PretrainModel(nn.Module):
    """The experiment's encoders (named as in `MultimodalModel`, so that their parameters load into
    it), a reconstruction head per masked-modelling encoder and a projection per encoder."""

    modalities: Sequence[str]
    encoders: Mapping[str, Mapping]
    targets: Mapping[str, int]  # modality -> the reconstruction head's width (absent: no head)
    width: int
    projection_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch, train: bool = False):
        out = {}
        for m in self.modalities:
            cls, kwargs = encoder_class(self.encoders[m])
            tokens, mask = cls(width=self.width, dtype=self.dtype, name=f"{m}_encoder", **kwargs)(batch[m], train=train)
            tokens = tokens.astype(jnp.float32)
            w = mask.astype(jnp.float32)
            pooled = (tokens * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
            z = Dense(self.projection_dim, name=f"{m}_projection")(pooled)
            # an absent modality pools to zeros: a norm whose gradient is finite there (the row is masked out)
            z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
            recon = Dense(self.targets[m], name=f"{m}_reconstruction")(tokens) if m in self.targets else None
            out[m] = {"reconstruction": recon, "mask": mask, "embedding": z}
        return out


# ---- Masking -----------------------------------------------------------------------------------------
def mask_batch(batch: dict, objs: dict, rng, mask_ratio: float, text_mask_ratio: float):
    """(the batch with hidden regions, {modality: (target, hidden [B, N], weights)}): for images and
    signals the target is each token's region of the input [B, N, region size] and weights its valid
    elements; for text the word piece ids [B, N]."""
    batch = dict(batch)
    targets = {}
    for i, (m, obj) in enumerate(objs.items()):
        if obj is None:
            continue
        key = jax.random.fold_in(rng, i)
        kind, unit = obj
        inputs = dict(batch[m])
        present = inputs["present"]
        if kind == "text":
            ids, valid = inputs["values"], inputs["mask"] & present[:, None] & (inputs["values"] >= _FIRST_WORD_ID)
            hidden = valid & (jax.random.uniform(key, ids.shape) < text_mask_ratio)
            inputs["values"] = jnp.where(hidden, UNK_ID, ids)
            targets[m] = (ids, hidden, None)
        elif kind == "image":
            x = inputs["values"]  # [B, H, W, C]
            b, h, w, c = x.shape
            gh, gw = h // unit[0], w // unit[1]
            hidden = (jax.random.uniform(key, (b, gh * gw)) < mask_ratio) & present[:, None]
            grid = hidden.reshape(b, gh, 1, gw, 1)
            pixels = jnp.broadcast_to(grid, (b, gh, unit[0], gw, unit[1])).reshape(b, h, w)
            inputs["values"] = jnp.where(pixels[..., None], 0, x)
            patches = x.reshape(b, gh, unit[0], gw, unit[1], c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
            targets[m] = (patches, hidden, jnp.ones_like(patches))
        else:  # signal [B, T, C], time mask [B, T]
            x, time_mask = inputs["values"], inputs["mask"]
            b, t, c = x.shape
            n = -(-t // unit)
            pad = ((0, 0), (0, n * unit - t))
            segments = jnp.pad(x, pad + ((0, 0),)).reshape(b, n, unit * c)
            valid = jnp.repeat(jnp.pad(time_mask, pad).reshape(b, n, unit), c, axis=-1).astype(jnp.float32)
            hidden = (jax.random.uniform(key, (b, n)) < mask_ratio) & present[:, None] & (valid.sum(-1) > 0)
            steps = jnp.repeat(hidden, unit, axis=1)[:, :t]
            inputs["values"] = jnp.where(steps[..., None], 0, x)
            targets[m] = (segments, hidden, valid)
        batch[m] = inputs
    return batch, targets


def contrastive_loss(embeddings: dict, present: dict, temperature: float):
    """(mean InfoNCE over the modality pairs that have >= 2 patients with both, top-1 retrieval accuracy
    of those pairs; both NaN-free scalars). `embeddings[m]` [B, D] normalized, `present[m]` [B] bool."""
    names = list(embeddings)
    total, acc, pairs = 0.0, 0.0, 0.0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = present[a] & present[b]
            n = both.sum()
            logits = embeddings[a] @ embeddings[b].T / temperature
            keep = both[:, None] & both[None, :]
            logits = jnp.where(keep, logits, -1e9)
            diag = jnp.diagonal(logits)
            row = jax.nn.logsumexp(logits, axis=1) - diag
            col = jax.nn.logsumexp(logits, axis=0) - diag
            loss = jnp.where(both, 0.5 * (row + col), 0).sum() / jnp.maximum(n, 1)
            hit = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])) & both
            counts = (n >= 2).astype(jnp.float32)
            total += counts * loss
            acc += counts * hit.sum() / jnp.maximum(n, 1)
            pairs += counts
    return total / jnp.maximum(pairs, 1.0), acc / jnp.maximum(pairs, 1.0)


def masked_losses(outputs: dict, targets: dict) -> dict:
    """{modality: masked-modelling loss} (mean over the hidden regions of the batch; 0 when none)."""
    losses = {}
    for m, (target, hidden, weights) in targets.items():
        pred = outputs[m]["reconstruction"]
        h = hidden.astype(jnp.float32)
        if weights is None:  # text: cross-entropy of the hidden word pieces
            logp = jax.nn.log_softmax(pred, axis=-1)
            nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            losses[m] = (nll * h).sum() / jnp.maximum(h.sum(), 1.0)
        else:  # mean squared error over each hidden region's valid elements
            err = jnp.square(pred - target.astype(jnp.float32)) * weights
            per_region = err.sum(-1) / jnp.maximum(weights.sum(-1), 1.0)
            losses[m] = (per_region * h).sum() / jnp.maximum(h.sum(), 1.0)
    return losses


def make_objective(model: PretrainModel, objs: dict, p: dict):
    """objective(params, batch, rng, train) -> (loss, metrics)."""

    def objective(params, batch, rng, train: bool):
        k_mask, k_dropout = jax.random.split(rng)
        masked, targets = mask_batch(batch, objs, k_mask, p["mask_ratio"], p["text_mask_ratio"])
        out = model.apply({"params": params}, masked, train=train, rngs={"dropout": k_dropout})
        metrics = {f"masked_{m}": v for m, v in masked_losses(out, targets).items()}
        loss = p["masked_weight"] * sum(metrics.values()) if metrics else 0.0
        if len(out) > 1 and p["contrastive_weight"] > 0:
            present = {m: batch[m]["present"] for m in out}
            c, acc = contrastive_loss({m: o["embedding"] for m, o in out.items()}, present, p["temperature"])
            loss = loss + p["contrastive_weight"] * c
            metrics.update(contrastive=c, retrieval_top1=acc)
        return loss, {"loss": loss, **metrics}

    return objective


def make_step(objective, tx):
    """step(state, batch) -> (state, metrics), jitted by the caller with the state donated."""
    import optax

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch, rng, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = tree_norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


# ---- The run -----------------------------------------------------------------------------------------
def build(exp: Experiment, p: dict, template: dict | None = None):
    """(PretrainModel, objectives) of the experiment's encoders; `template`: the model's input batch, if
    the caller has it (`exp.template_batch()` otherwise)."""
    template = exp.template_batch() if template is None else template
    objs = objectives(exp, template)
    if len(exp.modalities) < 2 and not any(objs.values()):
        raise ValueError(f"nothing to pretrain: one modality ({exp.modalities[0]}) whose encoder has no masked "
                         "modelling objective (tabular, or tokens that are not a grid over the input)")
    # the input's last axis: channels (a spectrogram: frequency bins x channels)
    targets = {m: _target_width(o, template[m]["values"].shape[-1] if o[0] != "text" else 0)
               for m, o in objs.items() if o}
    model = exp.model
    return PretrainModel(tuple(model.modalities), model.encoders, targets, model.width, int(p["projection_dim"]),
                         model.dtype), objs


def evaluate(exp: Experiment, strategy, objective, params, split: str = "validation", seed: int = 0) -> dict:
    """The objective's terms on `split`, weighted by rows, with the same masks at every evaluation (a
    fixed key per batch); one window per signal whatever `data.signal_eval_windows` says; every
    process's rows (the global batch, as training has it)."""

    def terms(params, batch, rng):
        metrics = objective(params, _inputs(batch, exp.modalities), rng, False)[1]
        return metrics, jnp.sum(batch["example_mask"])

    fn = jax.jit(terms)
    sums, rows = {}, 0
    for i, batch in enumerate(exp.eval_batches(split, windows=0)):
        batch = {k: v for k, v in batch.items() if k in exp.modalities or k == "example_mask"}
        # padding rows are absent from every modality: they add nothing to any term
        metrics, n = jax.device_get(fn(params, strategy.put(batch), jax.random.PRNGKey(seed + i)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * float(n)
        rows += int(n)
    return {k: v / rows for k, v in sums.items()} if rows else {}


def _inputs(batch: dict, modalities) -> dict:
    return {m: batch[m] for m in modalities}


def pretrain(config, workdir: str) -> dict:
    """Pretrains the encoders of `config`'s experiment in `workdir` (resuming its latest checkpoint);
    returns what `pretrain.json` records."""
    if config.parallel != "mesh":
        raise ValueError("--mode=pretrain runs with parallel='mesh' (the default)")
    parallel.maybe_initialize_distributed(config.distributed)
    p = settings(config)
    strategy = parallel.make_strategy("mesh", config.get("sharding", "replicated"))
    is_main = jax.process_index() == 0
    check_resume(config, workdir, p)
    if not is_main:  # one process prepares the dataset; the others wait for it, then read it
        parallel.barrier("mmjax: dataset prepared")
    exp = Experiment.from_config(config, workdir)
    if is_main:
        parallel.barrier("mmjax: dataset prepared")
    exp.check()
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        exp.save()
    template = _inputs(exp.template_batch(), exp.modalities)
    model, objs = build(exp, p, template)
    tx = make_optimizer(config.optimizer, p["num_steps"])

    def init(rng):
        k_params, k_dropout, k_run = jax.random.split(rng, 3)
        params = model.init({"params": k_params, "dropout": k_dropout}, template, train=False)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=k_run)

    state = strategy.create_state(init, jax.random.PRNGKey(config.seed))
    manager = checkpoint.make_manager(exp.path(CHECKPOINTS), p["checkpoint_every"], 2, "loss", lower_is_better=True)
    try:
        if manager.latest_step() is not None:
            state = strategy.restore(manager, state)[0]
            print(f"Resuming pretraining from step {int(state.step)} in {workdir}", flush=True)
        start = int(jax.device_get(state.step))
        n_params = {m: int(sum(x.size for x in jax.tree.leaves(state.params[f"{m}_encoder"])))
                    for m in exp.modalities}
        contrastive = len(objs) > 1 and p["contrastive_weight"] > 0
        terms = {m: ([f"masked {o[0]}"] if o else []) + (["contrastive"] if contrastive else [])
                 for m, o in objs.items()}
        described = ", ".join(f"{m} ({' + '.join(t) or 'nothing'})" for m, t in terms.items())
        print(f"Pretraining {described}: {p['num_steps']} steps of {p['batch_size']} training rows", flush=True)
        objective = make_objective(model, objs, p)
        step_fn = strategy.train_step(lambda *_: make_step(objective, tx))
        loader = exp.train_loader(p["batch_size"] // jax.process_count(), start_batch=start, rows=None,
                                  sampled=False)  # pretraining is not private
        batches = parallel.prefetch_to_device((_inputs(b, exp.modalities) for b in loader),
                                              config.data.get("device_prefetch", 2), strategy.put)
        from mmjax.training.metric_writer import MetricWriter

        writer = MetricWriter(workdir, p["num_steps"], p["batch_size"], resume_step=start)
        pending, step, started = [], start, time.perf_counter()
        while step < p["num_steps"]:
            state, metrics = step_fn(state, next(batches))
            step += 1
            pending.append(metrics)
            if step % p["log_every"] == 0 or step == p["num_steps"]:
                values = jax.device_get(pending)
                pending = []
                mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                if not np.isfinite(mean["loss"]):
                    raise checkpoint.NonFiniteState(f"pretraining loss is not finite at step {step}: lower "
                                                    "optimizer.learning_rate")
                writer.progress(step, mean["loss"])
                writer.write("pretrain", step, mean)
            if step % p["checkpoint_every"] == 0 or step == p["num_steps"]:
                checkpoint.save(manager, step, strategy.host_state(state), {"step": step},
                                force=step == p["num_steps"])
        manager.wait_until_finished()
    finally:
        manager.close()
    record = {"encoders": [f"{m}_encoder" for m in exp.modalities], "parameters": n_params,
              "encoder_settings": _plain({f"{m}_encoder": dict(model.encoders[m]) for m in exp.modalities}),
              "objectives": {m: (o[0] if o else None) for m, o in objs.items()}, "contrastive": contrastive,
              "settings": p, "recipe": exp.recipe, "steps": step, "seconds": round(time.perf_counter() - started, 1)}
    if "validation" in exp.splits:
        record["validation"] = evaluate(exp, strategy, objective, state.params)
        print("Validation: " + ", ".join(f"{k} {v:.4f}" for k, v in record["validation"].items()), flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, PRETRAIN_FILE), "w") as f:
            json.dump(record, f, indent=2)
        writer.close()
        print(f"Pretrained encoders in {workdir}: warm-start a supervised run with --config.init_from={workdir}",
              flush=True)
    return record


# what a resumed pretraining may change: how long it runs and what it logs and keeps, and the settings of
# the supervised run and evaluation (pretrain.* otherwise compared as `settings` resolves them)
_RESUME_MAY_CHANGE = ((RESUME_MAY_CHANGE - {"pretrain."}) | RESOLVED
                      | {"train.", "loss.", "best_metric", "data.label_fraction", "data.label_seed", "pretrain."})


def check_resume(config, workdir: str, p: dict) -> None:
    """A workdir with pretraining checkpoints resumes only with the config that made them (but for
    `_RESUME_MAY_CHANGE` and `MAY_CHANGE`): a `ConfigError` lists the differences, unless
    `--config.allow_config_change=True`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not (os.path.exists(path) and os.path.isdir(os.path.join(workdir, CHECKPOINTS))):
        return
    with open(path) as f:
        before = json.load(f)
    differ = config_differences(before, json.loads(config.to_json_best_effort()), _RESUME_MAY_CHANGE, new_keys=False)
    differ += resolved_differences(before, config, workdir)
    old = settings(ml_collections.ConfigDict(before))
    differ += [f"pretrain.{k}" for k in p if k not in MAY_CHANGE and old.get(k) != p[k]]
    if differ and not config.get("allow_config_change", False):
        raise ConfigError(f"{workdir} holds pretraining checkpoints of another config (differs in {differ[:8]}); "
                          "pretrain in another --workdir, or continue with --config.allow_config_change=True")
    if old["num_steps"] != p["num_steps"]:
        print(f"Note: pretrain.num_steps {old['num_steps']} -> {p['num_steps']}: the learning-rate schedule follows "
              "the new length from here", flush=True)


def _read_record(workdir: str) -> dict | None:
    path = os.path.join(os.path.abspath(workdir), PRETRAIN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _plain(tree):
    """JSON's view of settings (tuples as lists), so that recorded and current ones compare equal."""
    return json.loads(json.dumps(tree))


def shared_encoders(init_from: str, params, encoders: Mapping | None = None) -> dict | None:
    """{subtree: subtree} of the encoders a pretraining workdir `init_from` has and `params` (the supervised
    model's) has too; None when `init_from` is not a pretraining workdir. `encoders`: the supervised model's
    {modality: encoder settings} (`MultimodalModel.encoders`), which must be the pretraining's for every
    shared encoder (the same class and settings, not only the same parameter shapes)."""
    record = _read_record(init_from)
    if record is None:
        return None
    names = record["encoders"]
    shared = [e for e in names if e in params]
    if not shared:
        raise ValueError(f"init_from={init_from}: pretrained encoders {names}, none of them in this model "
                         f"({sorted(params)}); name them with init_params='target=source'")
    if encoders is not None and "encoder_settings" in record:
        now = _plain({f"{m}_encoder": dict(v) for m, v in encoders.items()})
        differ = {e: (record["encoder_settings"][e], now[e]) for e in shared
                  if record["encoder_settings"].get(e) != now.get(e)}
        for e, (before, after) in differ.items():
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise ValueError(f"init_from={init_from}: {e} was pretrained with other settings ("
                             + ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys)
                             + "); use the pretraining's model settings (a different config.recipe resolution "
                             "changes the signal encoder: set --config.recipe to the pretraining's "
                             f"{record.get('recipe', {}).get('name', '?')!r})")
    return {e: e for e in shared}
