"""One construction path: config -> dataset spec -> tasks and modalities -> model -> loss settings ->
optimizer -> init template -> train and eval steps, and the workdir's file names.

    exp = Experiment.from_config(config)          # prepares the data the config names
    exp = Experiment.from_workdir("workdirs/x")   # a trained run: its config.json and dataset_spec.json
    exp = Experiment.from_spec(spec, config)      # no data at all (a model to inspect or time, tests)

    params, step, how = exp.restore_params()      # a workdir's best checkpoint by validation
    outputs, aux = exp.model.apply({"params": params}, batch, train=False)

Training, evaluation, prediction, the report, compare, the benchmarks and the sweep all build
from here, so a change to how a model, a loss or a batch is made is made once.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from mmjax import losses
from mmjax.batch import fake_batch
from mmjax.config import lower_is_better, parse_list, parse_mapping
from mmjax.console import ConfigError
from mmjax.data import pipeline, sources
from mmjax.data.manifest.schema import ecg_rates_capped
from mmjax.data.spec import DatasetSpec
from mmjax.data.transforms import Spectrogram
from mmjax.models.build import _as_dict, build_model
from mmjax.models.model import MultimodalModel
from mmjax.training import checkpoint, privacy
from mmjax.training.optimizer import learning_rate_schedule, make_optimizer
from mmjax.training.parallel import device_batch
from mmjax.training.state import TrainState, create_state
from mmjax.training.step import make_eval_step, make_train_step

# What a workdir holds (relative paths).
CONFIG_FILE = "config.json"  # the resolved config
SPEC_FILE = "dataset_spec.json"  # modalities, statistics, vocabularies, tasks: what inference needs
SCHEMA_FILE = "schema.yaml"  # a manifest run's schema (predict reads new patients in it)
RESULTS_FILE = "results.json"  # the final validation and test metrics and the run's costs
CHECKPOINTS = "checkpoints"
CONFIG_HISTORY = "configs"  # configs/from_step_<N>.json: the config of each start (or resume) of the run
EVAL_DIR = "eval"  # eval/<split>.json, <split>_predictions.npz, <split>_robustness.json, ...
SMALL_SPLIT = 50  # evaluation splits below this many rows get a note at the start of training


class Experiment:
    """What a config builds, for one dataset spec. Cheap to make: the model is a flax module
    description, nothing is traced or compiled until a step is called."""

    def __init__(self, config, spec: DatasetSpec, workdir: str | None = None, builder=None):
        self.config = config
        self.spec = spec
        self.workdir = os.path.abspath(workdir) if workdir else None
        self._builder = builder

    @classmethod
    def from_config(cls, config, workdir: str | None = None) -> Experiment:
        """The experiment of `config` on the dataset its `data` block names (prepared if needed)."""
        builder = sources.builder_from_config(config.data)
        return cls(config, DatasetSpec.from_builder(builder), workdir, builder)

    @classmethod
    def from_spec(cls, spec: DatasetSpec, config) -> Experiment:
        """The experiment of `config` on a dataset described by `spec` alone (no data is read)."""
        return cls(config, spec)

    @classmethod
    def from_workdir(cls, workdir: str) -> Experiment:
        """The experiment a training run wrote to `workdir` (its config and dataset spec)."""
        workdir = os.path.abspath(workdir)
        for name in (CONFIG_FILE, SPEC_FILE):
            if not os.path.exists(os.path.join(workdir, name)):
                raise FileNotFoundError(f"{workdir} has no {name}: not a training workdir")
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            config = ml_collections.ConfigDict(json.load(f))
        return cls(config, DatasetSpec.load(os.path.join(workdir, SPEC_FILE)), workdir)

    # ---- What the config selects ------------------------------------------------------------------
    @functools.cached_property
    def tasks(self) -> tuple:
        return tuple(self.spec.select_tasks(parse_list(self.config.get("tasks", ""))))

    @functools.cached_property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.spec.select_modalities(parse_list(self.config.get("modalities", ""))))

    @property
    def windows(self) -> int:
        """Evaluation windows per long signal (`data.signal_eval_windows`; 0: the centre crop)."""
        return int(self.config.data.get("signal_eval_windows", 0))

    @property
    def windowed(self) -> tuple[str, ...]:
        """The signal modalities whose evaluation batches carry `windows` windows."""
        if not self.windows:
            return ()
        return tuple(m.name for m in self.spec.select_modalities(self.modalities) if m.kind == "signal")

    # ---- Loss --------------------------------------------------------------------------------------
    @functools.cached_property
    def loss_weights(self) -> dict:
        """Fixed task weights: 1 unless the config says otherwise; weights of the dataset's tasks that
        this run does not train are ignored with a warning; a name that is no task of the dataset is
        an error."""
        weights = {k: float(v) for k, v in parse_mapping(self.config.loss.weights, "loss.weights").items()}
        unknown = sorted(set(weights) - {t.name for t in self.spec.tasks})
        if unknown:
            raise ValueError(f"loss.weights names unknown task(s) {unknown}; dataset {self.spec.name!r} has "
                             f"{[t.name for t in self.spec.tasks]}")
        unused = sorted(set(weights) - {t.name for t in self.tasks})
        if unused:
            print(f"Warning: loss.weights for {unused} ignored (those tasks are not trained)", flush=True)
        return {t.name: weights.get(t.name, 1.0) for t in self.tasks}

    @functools.cached_property
    def recipe(self) -> dict:
        """The settings the training set's size changes (`config.recipe`, `small_data_recipe`):
        {'name', 'train_rows', 'changes': {setting: value}}."""
        return small_data_recipe(self.config, self.spec, self.tasks, self.modalities)

    @functools.cached_property
    def model_config(self):
        """`config.model` with the recipe's changes."""
        m = self.config.model.copy_and_resolve_references()
        for key, value in self.recipe["changes"].items():
            if key.startswith("model."):
                group, _, field = key[len("model."):].rpartition(".")
                (m[group] if group else m)[field] = value
        return m

    @functools.cached_property
    def class_weights(self) -> dict:
        """{task: class weights (multiclass) or positive weights (multilabel, binary)} from
        `loss.class_weights` ('task=balanced' or 'task=1:2:0.5'; balanced from the training split)."""
        setting = parse_mapping(self.recipe["changes"].get("loss.class_weights",
                                                           self.config.loss.get("class_weights", "")),
                                "loss.class_weights")
        known = {t.name: t for t in self.tasks}
        unknown = sorted(set(setting) - set(known))
        if unknown:
            raise ValueError(f"loss.class_weights names task(s) {unknown} not trained; tasks are {sorted(known)}")
        train = self.spec.split_sizes.get("train")
        return {name: losses.class_weights(known[name], v, train) for name, v in setting.items()}

    @functools.cached_property
    def task_weighting(self) -> losses.TaskWeighting:
        return task_weighting(self.config)

    @functools.cached_property
    def loss_settings(self) -> dict:
        """The train step's loss keywords: auxiliary heads, task weighting, focal loss, class weights."""
        return dict(loss_settings(self.config), class_weights=self.class_weights)

    # ---- Model, optimizer, steps ---------------------------------------------------------------------
    @functools.cached_property
    def model(self) -> MultimodalModel:
        """The model for the selected modalities (`config.modalities`, default all) and tasks."""
        model = build_model(self.model_config, self.spec.select_modalities(self.modalities), self.tasks,
                            modality_heads=self.config.loss.modality_heads_weight > 0,
                            uncertainty_weighting=self.task_weighting.kind == "uncertainty")
        self._check_patches(model)
        return model

    def check(self) -> None:
        """Builds what the config names so that a wrong setting fails now, before any compilation."""
        self.loss_weights, self.loss_settings, self.model, self.privacy  # noqa: B018

    def describe_splits(self) -> str | None:
        """A note when a split is too small for its metrics to mean much (None otherwise)."""
        sizes = {k: int(v) for k, v in self.spec.split_sizes.items()}
        small = {k: n for k, n in sizes.items() if k != "train" and n < SMALL_SPLIT}
        if not small:
            return None
        return (f"Note: the dataset splits {sizes} rows; {', '.join(f'{k} has {n}' for k, n in small.items())}: "
                f"metrics on fewer than {SMALL_SPLIT} rows have wide intervals, and a label without positives "
                "there has no AUROC (printed as nan)")

    def _check_patches(self, model) -> None:
        """An image must split into whole patches: said before the model is traced, with the flag to set."""
        per_modality = _as_dict(self.config.model.get("per_modality"))
        for m in self.spec.select_modalities(self.modalities):
            p = model.encoders[m.name].get("patch_size")
            if m.kind != "image" or not p or not m.shape:
                continue
            h, w = m.shape[:2]
            if h % p or w % p:
                fits = [d for d in range(min(h, w, p), 0, -1) if h % d == 0 and w % d == 0][:3]
                if "patch_size" in per_modality.get(m.name, {}):
                    setting = {**per_modality, m.name: {**per_modality[m.name], "patch_size": fits[0]}}
                    flag = f"--config.model.per_modality='{json.dumps(setting)}'"
                else:
                    flag = f"--config.model.{m.kind}.patch_size={fits[0]}"
                raise ConfigError(f"image modality {m.name!r} is {h}x{w}: not divisible into {p}x{p} patches; "
                                  f"patch sizes that fit: {fits}; set {flag}")

    @functools.cached_property
    def privacy(self) -> privacy.Plan | None:
        """The DP-SGD plan of `config.privacy` (None: ordinary training): its noise, sampling and epsilon."""
        rows = self.train_rows
        count = len(rows) if rows is not None else int(self.spec.split_sizes["train"])
        plan = privacy.plan(self.config, count, jax.device_count())
        weighted = plan and [t.name for t in self.tasks if t.kind == "multiclass" and
                             self.class_weights.get(t.name) is not None]
        if weighted:  # one row's weighted mean is its unweighted loss: the weights vanish
            raise ConfigError(f"--config.privacy.dp=True: multiclass class weights (loss.class_weights for "
                              f"{', '.join(weighted)}) are not supported with DP-SGD's per-example losses")
        return plan

    @functools.cached_property
    def optimizer(self):
        tx = make_optimizer(self.config.optimizer, self.config.train.num_steps)
        if self.privacy is None:
            return tx
        import optax

        return optax.chain(privacy.privatizer(self.privacy, self.config.seed), tx)

    def learning_rate(self, step: int) -> float:
        return float(learning_rate_schedule(self.config.optimizer, self.config.train.num_steps)(step))

    def template_batch(self, rows: int = 1) -> dict:
        """A batch of the model's input shapes (random values, every modality present): what parameter
        shapes are traced on. A spectrogram run's signals are transformed as the pipeline does."""
        mods = self.spec.select_modalities(self.modalities)
        batch = fake_batch(mods, self.tasks, rows, text_length=self.config.data.text_max_length)
        if self.config.data.spectrogram:
            for m in mods:
                if m.kind == "signal":
                    per_row = [Spectrogram(m.name).map({f"out/{m.name}": {k: v[i] for k, v in batch[m.name].items()}})
                               for i in range(rows)]
                    batch[m.name] = {k: np.stack([np.asarray(r[f"out/{m.name}"][k]) for r in per_row])
                                     for k in per_row[0][f"out/{m.name}"]}
        return device_batch(batch)

    def init_state(self, rng) -> TrainState:
        """Fresh parameters, optimizer state and loss state at step 0 (a pure function of `rng`: jit it
        with the shardings the state should have)."""
        loss_state = losses.init_loss_state(self.task_weighting, self.tasks)
        return create_state(self.model, self.optimizer, self.template_batch(), rng, loss_state)

    def abstract_params(self):
        """The parameters' shapes and dtypes, traced without computing anything."""
        return jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), self.template_batch(),
                                                      train=False)["params"])

    def train_step(self, axis_name: str | None = None, num_shards: int = 1):
        """The pure train step (`mmjax/training/step.py`); `axis_name` under pmap."""
        dp = self.privacy
        return make_train_step(self.model, self.optimizer, self.tasks, self.loss_weights, axis_name=axis_name,
                               num_shards=num_shards, accum_steps=accum_steps(self.config), **self.loss_settings,
                               dp_clip=None if dp is None else dp.clip_norm, dp_microbatch=0 if dp is None else
                               dp.microbatch)

    def eval_step(self):
        """The pure eval step: params, batch -> predictions (probabilities or values) per task."""
        return make_eval_step(self.model, self.tasks, self.windowed)

    # ---- Data --------------------------------------------------------------------------------------
    @property
    def builder(self):
        """The prepared dataset the config names (prepared on first use)."""
        if self._builder is None:
            builder = sources.builder_from_config(self.config.data)
            if self.workdir is not None:  # a trained run's: the data it recorded, not data changed since
                self._check_recorded_splits(DatasetSpec.from_builder(builder))
            self._builder = builder
        return self._builder

    def _check_recorded_splits(self, prepared: DatasetSpec) -> None:
        """The prepared dataset must have the split sizes and tasks this workdir's run recorded (its
        preprocessing statistics and vocabularies come from the record itself): otherwise the manifest
        or its files changed since training, and a split would hold other patients."""
        differ = [what for what, same in (("split sizes", dict(self.spec.split_sizes) == dict(prepared.split_sizes)),
                                          ("tasks", tuple(self.spec.tasks) == tuple(prepared.tasks))) if not same]
        if differ:
            raise ConfigError(f"{self.workdir} was trained on a dataset with other {' and '.join(differ)} than "
                              f"{self.config.data.get('manifest') or self.config.data.name} prepares now "
                              f"(split sizes recorded {dict(self.spec.split_sizes)}, now "
                              f"{dict(prepared.split_sizes)}): the data changed since training; evaluate on the "
                              "data the run was trained on")

    @property
    def splits(self) -> tuple[str, ...]:
        """The prepared dataset's splits."""
        return tuple(self.builder.info.splits)

    def data_kwargs(self) -> dict:
        d = self.config.data
        return dict(modalities=self.modalities, tasks=self.tasks, text_max_length=d.text_max_length,
                    spectrogram=d.spectrogram)

    @functools.cached_property
    def train_rows(self) -> np.ndarray | None:
        """The training records that are trained on (`data.label_fraction` < 1: a seeded subset, the
        baselines' too); None: all of them."""
        d = self.config.data
        fraction = float(d.get("label_fraction", 1.0))
        if fraction == 1:
            return None
        return pipeline.label_rows(int(self.spec.split_sizes["train"]), fraction, int(d.get("label_seed", 0)))

    def train_loader(self, batch_size: int, seed: int | None = None, sampled: bool = True, **kwargs):
        """The training split's loader (`mmjax/data/pipeline.py`), `batch_size` rows per process; with
        `config.privacy.dp` (and `sampled`) the privacy plan's sampled batches of its capacity."""
        d = self.config.data
        kwargs.setdefault("rows", self.train_rows)
        if sampled and self.privacy is not None:  # DP-SGD: the plan's sampled batches of its capacity rows
            if jax.process_count() > 1:
                raise ConfigError("--config.privacy.dp=True trains in one process")
            kwargs.pop("shard_index", None), kwargs.pop("shard_count", None)  # one process: all of each batch
            return pipeline.sampled_loader(self.builder, self.spec, self.privacy.batches(self.config.seed),
                                           self.privacy.capacity, self.config.seed if seed is None else seed,
                                           augment=d.augment, worker_count=d.worker_count,
                                           cache_mib=d.get("cache_mib", 2048), **self.data_kwargs(), **kwargs)
        return pipeline.train_loader(self.builder, self.spec, batch_size, self.config.seed if seed is None else seed,
                                     augment=d.augment, worker_count=d.worker_count, cache_mib=d.get("cache_mib", 2048),
                                     **self.data_kwargs(), **kwargs)

    def eval_batches(self, split: str, batch_size: int | None = None, source=None, windows: int | None = None):
        """One padded pass over `split` (this process's shard), or over `source`, a list of examples
        in the dataset's feature format (new patients); `windows`: signal windows per example instead of
        the config's (`data.signal_eval_windows`; 0: one centre crop)."""
        size = batch_size or self.config.eval_batch_size // jax.process_count()
        if size * jax.process_count() % jax.device_count():
            raise ConfigError(f"--config.eval_batch_size={size * jax.process_count()} must be divisible by the "
                              f"{jax.device_count()} devices")
        if source is None and split not in self.builder.info.splits:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(self.builder.info.splits)}")
        return pipeline.eval_batches(self.builder if source is None else source, self.spec, split, size,
                                     signal_windows=self.windows if windows is None else windows,
                                     **self.data_kwargs())

    # ---- Workdir -------------------------------------------------------------------------------------
    def path(self, *names: str) -> str:
        if self.workdir is None:
            raise ValueError("this experiment has no workdir")
        return os.path.join(self.workdir, *names)

    def save(self) -> None:
        """Writes the config, the dataset spec and (manifest datasets) the schema to the workdir."""
        os.makedirs(self.workdir, exist_ok=True)
        self.save_config(CONFIG_FILE)
        self.spec.save(self.path(SPEC_FILE))
        schema = getattr(getattr(self._builder, "builder_config", None), "schema", None)
        if schema is not None:
            shutil.copyfile(schema.path, self.path(SCHEMA_FILE))

    def save_config(self, name: str) -> None:
        """The config as JSON in the workdir's file `name`."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:  # replaced whole: another process may be reading it
            f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(path + ".tmp", path)

    def best_step(self) -> tuple[int, str]:
        """(step, how it was chosen): the best checkpoint by validation `best_metric`, else the latest."""
        metric = self.config.best_metric
        return checkpoint.best_step(self.path(CHECKPOINTS), metric, lower_is_better(metric))

    def restore_params(self, step: int | None = None) -> tuple[dict, int, str]:
        """(params, step, how it was chosen) of the workdir's checkpoint `step` (default: the best)."""
        chosen, fallbacks = "--step", ()
        if step is None:  # the best; an unreadable checkpoint falls back to the next best, or the newest
            metric = self.config.best_metric
            order, chosen = checkpoint.ranked_steps(self.path(CHECKPOINTS), metric, lower_is_better(metric))
            step, fallbacks = order[0], order[1:]
        params, read = checkpoint.restore_params(self.workdir, self.abstract_params(), step=step,
                                                 label="evaluating the checkpoints of ", fallbacks=fallbacks)
        if read != step:
            chosen = f"step {step} cannot be read; the next by the same rule"
        return params, int(read), chosen


SMALL_DATA_ROWS = 1000  # fewer training rows than this: the small-data recipe (config.recipe='auto')
RECIPES = ("auto", "small", "standard")


def small_data_recipe(config, spec: DatasetSpec, tasks, modalities) -> dict:
    """What `config.recipe` changes: 'standard' nothing; 'small' (and 'auto' below `SMALL_DATA_ROWS`
    training rows, counted after `data.label_fraction`) the settings left at their defaults that keep a
    model from learning on a few hundred patients (docs/own_data.md, "A few hundred patients"):

    - signal modalities with the default `signal` encoder (a patch Transformer) get `resnet1d` with
      `stages='small'` (~0.2M parameters: one residual block per stage, 32-64-128 channels);
    - multiclass tasks without `loss.class_weights` get balanced class weights, so that a dominant class
      (72% sinus rhythm) is not the whole answer.
    A setting the config changed from its default is kept as given."""
    name = config.get("recipe", "standard")
    if name not in RECIPES:
        raise ConfigError(f"--config.recipe={name!r}: use one of {list(RECIPES)}")
    rows = int(spec.split_sizes.get("train", 0))
    fraction = float(config.data.get("label_fraction", 1.0))
    rows = rows if fraction == 1 else max(1, round(fraction * rows))
    if name == "auto":
        name = "small" if rows < SMALL_DATA_ROWS else "standard"
    changes = {}
    if name == "small":
        signal = config.model.signal
        per_modality = _as_dict(config.model.get("per_modality"))
        signals = [m.name for m in spec.select_modalities(modalities) if m.kind == "signal"]
        # a signal modality with its own settings (model.per_modality) keeps the encoder they are for
        if signals and not any(m in per_modality for m in signals) and signal.get("encoder", "signal") == "signal":
            changes["model.signal.encoder"] = "resnet1d"
            if signal.get("stages", "18") == "18":  # stages changed by the config: its choice
                changes["model.signal.stages"] = "small"
        given = config.loss.get("class_weights", "")
        named = parse_mapping(given, "loss.class_weights")
        # balanced weights need each class in the training split; a task the config weighs keeps its weights
        balanced = [t.name for t in tasks if t.kind == "multiclass" and t.name not in named
                    and len(t.class_counts) == t.num_outputs and min(t.class_counts) > 0]
        if balanced and not (config.get("privacy", None) or {}).get("dp", False):  # DP-SGD: see privacy.py
            changes["loss.class_weights"] = ",".join([given] * bool(given) + [f"{t}=balanced" for t in balanced])
    return {"name": name, "train_rows": rows, "changes": changes}


# Settings compared by what they do to this run, not as written (a workdir from before they existed, or
# with another value that resolves the same, resumes and is read back)
RESOLVED = frozenset({"recipe", "data.ecg_rate"})


def resolved_differences(before: dict, config, workdir: str) -> list[str]:
    """Of `RESOLVED`, the settings that do something else to the run in `workdir` under `config` than under
    the saved config `before` (a dict): the recipe's changes on the saved dataset spec, the ECG rates the
    saved schema's signals are prepared at."""
    old = ml_collections.ConfigDict(before)
    with old.unlocked():
        if "recipe" not in old:  # what a config without it meant
            old.recipe = "standard"
    differ = []
    spec_path = os.path.join(workdir, SPEC_FILE)
    if os.path.exists(spec_path):
        spec = DatasetSpec.load(spec_path)  # the modalities and tasks each config selects, as training does
        if Experiment.from_spec(spec, old).recipe["changes"] != Experiment.from_spec(spec, config).recipe["changes"]:
            differ.append("recipe")
    elif old.recipe != config.get("recipe", "standard"):
        differ.append("recipe")
    schema_path = os.path.join(workdir, SCHEMA_FILE)
    rate_before, rate_now = (float((c.get("data") or {}).get("ecg_rate", 0) or 0) for c in (old, config))
    if os.path.exists(schema_path):
        import yaml

        with open(schema_path) as f:
            modalities = (yaml.safe_load(f) or {}).get("modalities") or {}
        capped = [{m: rate for m in ecg_rates_capped(modalities, rate)} for rate in (rate_before, rate_now)]
        if capped[0] != capped[1]:
            differ.append("data.ecg_rate")
    elif rate_before != rate_now and (config.get("data") or {}).get("name") == "manifest":
        differ.append("data.ecg_rate")
    return differ


def task_weighting(config) -> losses.TaskWeighting:
    """`loss.task_weighting`; the older `loss.uncertainty_weighting=True` means 'uncertainty'."""
    c = config.loss
    kind = c.get("task_weighting", "fixed")
    if c.get("uncertainty_weighting", False):
        if kind not in ("fixed", "uncertainty"):
            raise ValueError(f"loss.uncertainty_weighting=True conflicts with loss.task_weighting={kind!r}")
        kind = "uncertainty"
    return losses.TaskWeighting(kind, int(c.get("dwa_window", 50)), float(c.get("dwa_temperature", 2.0)))


def loss_settings(config) -> dict:
    """The train step's loss keywords that the config alone sets (class weights need the data)."""
    c = config.loss
    gamma, alpha = float(c.get("focal_gamma", 0.0)), float(c.get("focal_alpha", -1.0))
    if gamma < 0 or not (alpha == -1.0 or 0.0 <= alpha <= 1.0):
        raise ValueError(f"loss.focal_gamma={gamma} must be >= 0 and loss.focal_alpha={alpha} in [0, 1] or -1 (off)")
    return dict(modality_heads_weight=float(c.modality_heads_weight), task_weighting=task_weighting(config),
                focal_gamma=gamma, focal_alpha=None if alpha == -1.0 else alpha)


def accum_steps(config) -> int:
    """`train.accum_steps`: microbatches per step (1: none)."""
    k = int(config.train.get("accum_steps", 1))
    if k < 1:
        raise ConfigError(f"--config.train.accum_steps={k} must be >= 1")
    return k


def check_divisible(config) -> None:
    """Batch sizes must split evenly over the devices (a training batch into `accum_steps` microbatches
    that each do)."""
    n_dev, k = jax.device_count(), accum_steps(config)
    if config.train.batch_size % (n_dev * k):
        raise ConfigError(f"--config.train.batch_size={config.train.batch_size} must be divisible by the {n_dev} "
                          f"devices{f' times train.accum_steps={k}' if k > 1 else ''}")
    if config.eval_batch_size % n_dev:
        raise ConfigError(f"--config.eval_batch_size={config.eval_batch_size} must be divisible by the {n_dev} "
                          "devices")
