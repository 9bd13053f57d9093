r"""What the experiment files share: every option with its default (`base_config`), the manifest data
block (`manifest_config`, `public_config`), the `smoke` variant and the parser of the arguments after
the colon (`experiments/x.py:fusion=concat,smoke`).

How experiment files import each other: as the package `experiments`, with absolute imports,

    from experiments.common import base_config, parse_arg, smoke
    from experiments import synthetic_patients

as big_vision's configs import `big_vision.configs.common`. No experiment file edits `sys.path`:
the repository root is on it already wherever experiments are run from,
  - `python launch.py ...` from any directory (Python puts the script's folder, the root, first);
  - `python -m mmjax.training.sweep --config=experiments/fusion_sweep.py`,
    `python -m mmjax.benchmarks.train_step` and `python -m pytest`, run from the root, as the
    README's commands are (`python -m` puts the current directory first);
and `config_flags` loading a file by path does not change that. (Bare `pytest`, or `python -m` from
another directory with an absolute `--config`, lacks the root: run them from the root with
`python -m`.) Loading a config imports no jax and no flax: the fusion and encoder settings come from
`mmjax.models.settings`, which reads the model files' source (`tests/test_settings.py` checks both).
"""

import os

import ml_collections

from mmjax.models.settings import encoder_config, fusion_config

# `../shared/data` beside the repository: where the public datasets' own files are
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def parse_arg(arg, defaults: dict, flags=("smoke",)) -> dict:
    """'a=1,b=x,smoke' -> options; keys must be in `defaults` (valued) or `flags` (bare)."""
    opts = {**defaults, **dict.fromkeys(flags, False)}
    for item in (arg or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key in flags and not value:
            opts[key] = True
        elif key in defaults and value:
            opts[key] = value
        else:
            raise ValueError(f"unknown experiment argument {item!r}; use {', '.join(f'{k}=' for k in defaults)}"
                             f"{', ' if flags else ''}{', '.join(flags)}")
    return opts


def smoke(c: ml_collections.ConfigDict, num_steps: int = 4, every: int = 2, warmup_steps: int = 1,
          eval_batch_size: int = 16) -> ml_collections.ConfigDict:
    """The `smoke` variant of any experiment: a few steps at small width, for tests. `every`: the
    evaluation and checkpoint interval."""
    c.model.update(width=32, num_heads=2)
    c.model.fusion.depth = 1
    c.train.update(batch_size=16, num_steps=num_steps, log_every=2, eval_every=every, checkpoint_every=every,
                   figures=False)
    c.optimizer.warmup_steps = warmup_steps
    c.eval_batch_size = eval_batch_size
    c.eval.bootstrap_resamples = 50
    c.eval.group_permutations = 100
    c.eval.baselines = False  # ~5-30 s a run (neurokit2's import, the fits): tests that need them turn them on
    c.recipe = "standard"  # the model as configured, whatever the (tiny) dataset's size
    return c


def base_config(fusion: str = "cross_attention", modalities: str = "") -> ml_collections.ConfigDict:
    """Everything an experiment configures; the data block names the dataset (`manifest_config` for a
    manifest dataset)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.modalities = modalities  # '+'-separated subset of the dataset's modality names; empty: all
    c.tasks = ""  # comma-separated subset of the dataset's tasks; empty: all
    c.data = ml_collections.ConfigDict(dict(
        name="synthetic_patients", config="default", data_dir="", text_max_length=64,
        spectrogram=False, augment=True, worker_count=0,
        device_prefetch=2,  # training batches put on the device this many steps ahead (0: as the step needs them)
        cache_mib=2048,  # training examples read and prepared once, kept in memory if the split fits (0: never)
        signal_eval_windows=0,  # evaluation: 0 centre-crops a long signal, W > 0 averages W windows
        # label efficiency: train (and fit the baselines) on a seeded fraction of the training rows
        label_fraction=1.0, label_seed=0))
    c.model = ml_collections.ConfigDict(dict(
        width=64, dtype="float32", num_heads=2, mlp_ratio=2, dropout=0.0, modality_dropout=0.15,
        # The fusion's and each kind's encoder settings: every registered fusion's (encoder's) fields
        # with their defaults, so any of them can be set from the command line; `fusion.name` and
        # `<kind>.encoder` choose the class (mmjax/models/build.py).
        fusion=fusion_config(fusion, depth=2),
        image=encoder_config("image", patch_size=16, depth=1), text=encoder_config("text", depth=1),
        tabular=encoder_config("tabular", depth=1), signal=encoder_config("signal", patch_size=50, depth=1),
        # 'encoders', 'fusion' or 'encoders+fusion': recompute those modules' activations in the backward
        # pass instead of keeping them (less memory, ~a third more compute; same numbers)
        remat="",
        per_modality=""))  # JSON, settings for one modality by name: '{"lateral": {"patch_size": 8}}'
    c.loss = ml_collections.ConfigDict(dict(
        weights="",  # fixed task weights: 'task=w,...' (default 1 each)
        # 'task=balanced' or 'task=1:2:0.5': class weights (multiclass, a weighted mean) or positive
        # weights per label (multilabel, binary: BCEWithLogitsLoss(pos_weight=); balanced = n_neg / n_pos)
        class_weights="",
        focal_gamma=0.0, focal_alpha=-1.0,  # focal loss on classification tasks (gamma 0: off; alpha -1: off)
        # fixed | uncertainty (Kendall 2018) | dwa (Liu 2019) | pcgrad (Yu 2020); fixed weights apply to dwa
        # and pcgrad too. uncertainty_weighting=True is the older spelling of task_weighting='uncertainty'.
        task_weighting="fixed", uncertainty_weighting=False,
        dwa_window=50, dwa_temperature=2.0,  # DWA: steps per window (the paper's epoch), softmax temperature
        modality_heads_weight=0.5))  # auxiliary per-encoder heads (0: off); see mmjax/models/model.py
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=100, end_lr_factor=0.02, weight_decay=0.05, b1=0.9, b2=0.999,
        clip_norm=1.0))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, num_steps=1500, log_every=50, eval_every=500, checkpoint_every=500,
        accum_steps=1,  # K > 1: each batch in K microbatches, gradients summed (a K-th of the activation memory)
        keep_checkpoints=2, stop_at_step=0,  # stop_at_step > 0 stops there, as a preemption would
        # the checkpoint the final validation and test evaluation use: 'best' (by best_metric on
        # validation, the usual model selection; the last one when there is no validation split) or 'last'
        final_checkpoint="best",
        figures=True))  # ROC, reliability and confusion figures in TensorBoard at the end (smoke: off, 4 s a run)
    c.eval_batch_size = 256
    # the end-of-training and `--mode=evaluate` intervals: patient-level bootstrap (0 resamples: none)
    c.eval = ml_collections.ConfigDict(dict(
        bootstrap_resamples=1000, bootstrap_seed=0, level=0.95,
        calibration_bins=10,  # equal-width bins of the ECE and the reliability diagram
        operating_point="youden", target_sensitivity=0.9,  # threshold chosen on validation: youden | sensitivity
        # classical baselines fitted on the same split beside the end-of-training and --mode=evaluate results,
        # the best compared with the model (mmjax/evaluation/baselines.py)
        baselines=True,
        ecg_intervals_max_rows=2000,  # an ECG baseline's PQ/QS/QT intervals (~70 ms a record) up to this many rows
        # --mode=evaluate's results per subgroup (mmjax/evaluation/subgroups.py): sex, age bands, site, these
        # manifest columns (comma-separated) and subsets of present modalities; smaller groups only counted
        groups="", age_bands="40,60,80", min_group_patients=10, group_permutations=1000))
    # DP-SGD (mmjax/training/privacy.py; pip install -e ".[privacy]"): per-example clipping to clip_norm, Gaussian
    # noise of noise_multiplier * clip_norm (or calibrated to target_epsilon at delta; delta 0: 1 / (10 N)),
    # batches Poisson-sampled with train.batch_size expected rows (capacity 0: B + 4 sqrt(B), the rest truncated
    # and accounted) or 'fixed'-size; epsilon from dp-accounting's PLD accountant, logged at each evaluation
    # federated training (mmjax/training/federated.py): sites = a manifest column or a count of simulated sites
    # ('' off); train.num_steps counts local steps (num_steps / local_steps rounds); algorithm fedavg | fedprox
    # (mu) | centralized | local (only_site); fraction of sites per round; simulated sites: Dirichlet label skew
    # and absent modalities ('auto': site 0 has no signal)
    c.federated = ml_collections.ConfigDict(dict(
        sites="", algorithm="fedavg", local_steps=10, fraction=1.0, mu=0.01, label_skew=0.5, absent="auto",
        only_site=""))
    c.privacy = ml_collections.ConfigDict(dict(
        dp=False, clip_norm=1.0, noise_multiplier=1.0, target_epsilon=0.0, delta=0.0, sampling="poisson",
        capacity=0, microbatch=0))
    # --mode=pretrain (mmjax/training/pretrain.py): masked modelling per modality + cross-modal contrastive;
    # batch_size 0: train.batch_size
    c.pretrain = ml_collections.ConfigDict(dict(
        num_steps=1000, batch_size=0, mask_ratio=0.5, text_mask_ratio=0.15, masked_weight=1.0,
        contrastive_weight=1.0, temperature=0.1, projection_dim=128, log_every=50, checkpoint_every=250))
    # 'auto': the small-data recipe below 1,000 training rows (mmjax/experiment.py, small_data_recipe: a small
    # ResNet signal encoder, balanced multiclass weights; only settings left at their defaults), else none;
    # 'small' or 'standard' to choose
    c.recipe = "auto"
    c.parallel = "mesh"  # or "pmap"
    # mesh only: "replicated" (each device holds the whole state) or "fsdp" (parameters and optimizer state
    # sharded over the devices, gathered layer by layer in the step: a device-count-th of the state's memory)
    c.sharding = "replicated"
    # jax.distributed.initialize(): also without this under srun or mpirun with several processes, with
    # JAX_COORDINATOR_ADDRESS, or launch.py's --coordinator_address (docs/training.md, "Several processes")
    c.distributed = False
    c.init_from = ""  # a workdir or checkpoint dir to warm-start parameters from
    c.init_params = ""  # subtrees to take from init_from: 'image_encoder' or 'xray_encoder=image_encoder,...'; '': all
    c.best_metric = "macro_auroc"  # validation metric that picks the kept best checkpoint ('task.metric' too)
    # resuming a workdir with another config (beyond mmjax.config.RESUME_MAY_CHANGE) is refused unless True
    c.allow_config_change = False
    return c


def manifest_config(fusion="cross_attention", modalities="", manifest="", schema=""):
    """`base_config` with a manifest data block: what every real-data experiment starts from."""
    c = base_config(fusion, modalities)
    c.data = dict(name="manifest", config="", manifest=manifest, schema=schema, data_dir="", public="",
                  source_dir="", split_fractions="train=0.8,validation=0.1,test=0.1",
                  # patient-level k-fold: folds=5 alone runs every fold and pools them (W/cv/); fold=k runs one
                  folds=0, fold=-1, on_error="",
                  # comma-separated folders the manifest's files may be in (empty: the manifest's folder;
                  # a public dataset: its source_dir too); '..', absolute paths and symlinks out of them are bad rows
                  allowed_roots="",
                  max_pixels=2**28,  # a bigger image (a DICOM: all frames) is a bad row, never decoded; 0: no cap
                  # an ECG (named ecg/ekg, or lead-named channels) above this rate is prepared at it (0: schema's)
                  ecg_rate=100,
                  text_min_patients=5,  # a word enters a text vocabulary only from the notes of this many patients
                  prepare_workers=0, text_max_length=64, spectrogram=False, augment=True, worker_count=0,
                  device_prefetch=2, cache_mib=2048, signal_eval_windows=0, label_fraction=1.0, label_seed=0)
    c.train.update(num_steps=1000, eval_every=250, checkpoint_every=250)
    return c


def public_config(public: str, folder: str, arg, **variants):
    """A real-data experiment: the converter `mmjax.data.public.<public>` on `../shared/data/<folder>`
    (or `--config.data.source_dir`), with `arg` parsed for fusion=, modalities= and smoke."""
    opts = parse_arg(arg, {"fusion": "cross_attention", "modalities": "", **variants})
    c = manifest_config(opts["fusion"], opts["modalities"])
    c.data.public = public
    c.data.source_dir = os.path.join(SHARED_DATA, folder)
    return c, opts
