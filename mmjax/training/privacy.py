"""Differentially private training (DP-SGD, Abadi et al., 2016) of the multimodal model as it is, with
the field's libraries: `jax-privacy` for the per-example clipping, the Gaussian noise and the batch
sampling, `dp-accounting` (through jax-privacy's DP-SGD accountant) for the privacy spent.

    python launch.py --config.privacy.dp=True --config.privacy.target_epsilon=3 --workdir=workdirs/dp3

`--config.privacy.*` (experiments/common.py):
- `clip_norm` C: every example's gradient (of its own loss: the sum over tasks of the task weights times
  the example's loss per task, auxiliary heads included) is scaled to L2 norm at most C
  (`jax_privacy.clipped_grad`, vmapped over the examples, `microbatch` at a time if set);
- `noise_multiplier` sigma, or `target_epsilon` (> 0) at `delta` (0: 1 / (10 N) for N training rows):
  sigma calibrated so that the whole run (`train.num_steps`) spends that epsilon; Gaussian noise of
  standard deviation sigma * C is added to the sum of the clipped gradients (`jax_privacy.noise_addition`,
  its key kept in the optimizer state, so a resumed run draws the noise it would have drawn), which is
  divided by the expected batch size B = `train.batch_size` before the optimizer (post-processing);
- `sampling`: 'poisson' (each training row in a step's batch with probability B / N, independently:
  what the accountant assumes; the batch is padded to `capacity` rows, default B + 4 sqrt(B), and a
  larger draw is truncated at random, which the accountant accounts for) or 'fixed' (B rows drawn
  without replacement each step; accounted with the replace-one relation's doubled sensitivity).
  The step's batches are drawn by `jax_privacy.batch_selection` from `seed` and are a pure function of
  (seed, step): a resumed run reads the batches it would have read.

Epsilon (at `delta`, add-or-remove-one adjacency; PLD accountant) is logged at every evaluation,
written into `results.json` (`run.privacy`) and shown in the report. What it covers is the model's
training on the training rows. It does not cover what is computed from the training rows before
training: the tabular standardization statistics, the image mean and standard deviation and the text
vocabulary (words of at least `text_min_patients` patients) of a manifest's preparation, the
small-data recipe's choice (from the row count) and class weights (from the label counts), and the
classical baselines (fitted without privacy): these are not private. The losses and the gradient norm
(of the clipped sum, before the noise) that the console and metrics.jsonl log are not private either
(they are monitoring; report only the model).

Limits: one process (the batches are drawn on the host for the whole run); `task_weighting` 'fixed'
(DWA's weights come from the training losses, which are not privatized; uncertainty weighting's
log-variances and PCGrad's projections are not per-example sums); no multiclass class weights (one
row's weighted mean is its unweighted loss: the small-data recipe adds none under DP); `accum_steps` 1
(`microbatch` bounds the per-example gradients' memory instead); a resume keeps `train.num_steps`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mmjax.console import ConfigError

SAMPLINGS = ("poisson", "fixed")


def _require():
    try:
        import dp_accounting  # noqa: F401
        import jax_privacy  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--config.privacy.dp=True needs jax-privacy and dp-accounting ({e}): "
                          "pip install -e \".[privacy]\"") from e


@dataclasses.dataclass(frozen=True)
class Plan:
    """A DP-SGD run's privacy settings, resolved."""
    clip_norm: float
    noise_multiplier: float
    delta: float
    num_examples: int  # N, the training rows
    batch_size: int  # B, expected (Poisson) or exact (fixed)
    capacity: int  # rows in a step's batch (padding included)
    num_steps: int
    sampling: str
    target_epsilon: float = 0.0  # > 0: noise_multiplier was calibrated to it
    microbatch: int = 0

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.num_examples

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on the sum of clipped gradients."""
        return self.noise_multiplier * self.clip_norm

    def _params(self, noise_multiplier: float | None = None):
        from jax_privacy.accounting import analysis

        method = analysis.SamplingMethod.POISSON if self.sampling == "poisson" else \
            analysis.SamplingMethod.FIXED_BATCH_SIZE
        truncated = self.capacity if self.sampling == "poisson" and self.capacity < self.num_examples else None
        return analysis.DpParams(noise_multipliers=self.noise_multiplier if noise_multiplier is None else
                                 noise_multiplier, num_samples=self.num_examples, delta=self.delta,
                                 batch_size=self.batch_size, sampling_method=method, truncated_batch_size=truncated,
                                 is_finite_guarantee=math.isfinite(self.clip_norm))

    def epsilon(self, steps: int) -> float:
        """The epsilon spent by `steps` steps (at `delta`)."""
        if steps <= 0:
            return 0.0
        if self.noise_multiplier <= 0 or not math.isfinite(self.clip_norm):
            return float("inf")
        return float(accountant().compute_epsilon(int(steps), self._params()))

    def batches(self, seed: int) -> list[np.ndarray]:
        """The training rows of every step's batch (indices into the N training rows), drawn by
        jax-privacy's batch selection from `seed`."""
        from jax_privacy import batch_selection

        if self.sampling == "poisson":
            strategy = batch_selection.CyclicPoissonSampling(sampling_prob=self.sampling_rate,
                                                             iterations=self.num_steps,
                                                             truncated_batch_size=self.capacity)
        else:
            strategy = batch_selection.FixedBatchSampling(batch_size=self.batch_size, iterations=self.num_steps)
        return [np.sort(np.asarray(b, np.int64)) for b in strategy.batch_iterator(self.num_examples, rng=seed)]

    def describe(self) -> str:
        """One line for the console at the start of training."""
        how = f" (calibrated to epsilon {self.target_epsilon:g})" if self.target_epsilon else ""
        return (f"DP-SGD: clip norm {self.clip_norm:g}, noise multiplier {self.noise_multiplier:.4g}{how}, "
                f"{self.sampling} sampling of {self.batch_size} of {self.num_examples} training rows a step (batches "
                f"of {self.capacity} rows), delta {self.delta:.2e}: epsilon {self.epsilon(self.num_steps):.3g} after "
                f"{self.num_steps} steps. Not private: the preprocessing's statistics and vocabulary and the classical "
                "baselines (docs/training.md, Differential privacy)")

    def summary(self, steps: int) -> dict:
        """What `results.json` and the report keep."""
        return {"epsilon": self.epsilon(steps), "delta": self.delta, "steps": int(steps),
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "sampling": self.sampling, "sampling_rate": self.sampling_rate,
                "expected_batch_size": self.batch_size, "capacity": self.capacity,
                "training_rows": self.num_examples, "target_epsilon": self.target_epsilon or None,
                "accountant": f"PLD, discretization {PLD_INTERVAL} (dp-accounting, through jax-privacy's "
                              "DpsgdTrainingAccountant)",
                "adjacency": "add or remove one row" if self.sampling == "poisson" else
                "replace one row (sensitivity doubled)"}


PLD_INTERVAL = 1e-3  # the PLD's discretization of the privacy loss: pessimistic, ~0.3 s an epsilon at 1,500 steps


def accountant():
    from jax_privacy.accounting import accountants, analysis

    return analysis.DpsgdTrainingAccountant(accountants.PldAccountantConfig(value_discretization_interval=PLD_INTERVAL))


def default_capacity(batch_size: int) -> int:
    """Rows in a Poisson-sampled step's batch: B + 4 sqrt(B), up to a multiple of 8 (a larger draw,
    probability about 3e-5 a step, is truncated at random and accounted)."""
    return int(8 * math.ceil((batch_size + 4 * math.sqrt(batch_size)) / 8))


def plan(config, num_examples: int, devices: int = 1) -> Plan | None:
    """The run's `Plan` (None without `privacy.dp`); checks what DP-SGD supports and calibrates the noise
    to `privacy.target_epsilon` when it is set."""
    p = config.get("privacy", None)
    if not p or not p.get("dp", False):
        return None
    _require()
    sampling = str(p.get("sampling", "poisson"))
    if sampling not in SAMPLINGS:
        raise ConfigError(f"--config.privacy.sampling={sampling!r}: use one of {', '.join(SAMPLINGS)}")
    kind = config.loss.get("task_weighting", "fixed")
    if kind != "fixed" or config.loss.get("uncertainty_weighting", False):
        raise ConfigError(f"--config.privacy.dp=True works with loss.task_weighting='fixed', not {kind!r} (its "
                          "weights come from the training losses, not privatized, or its terms are not sums of "
                          "per-example losses)")
    if int(config.train.get("accum_steps", 1)) != 1:
        raise ConfigError("--config.privacy.dp=True: use privacy.microbatch to bound memory, not train.accum_steps")
    if config.get("parallel", "mesh") != "mesh":
        raise ConfigError("--config.privacy.dp=True runs with --config.parallel=mesh")
    clip = float(p.get("clip_norm", 1.0))
    if not 0 < clip < math.inf:
        raise ConfigError(f"--config.privacy.clip_norm={clip} must be finite and > 0")
    batch = int(config.train.batch_size)
    if batch > num_examples:
        raise ConfigError(f"--config.train.batch_size={batch} is larger than the {num_examples} training rows")
    capacity = int(p.get("capacity", 0)) or (default_capacity(batch) if sampling == "poisson" else batch)
    capacity = min(capacity, num_examples) if sampling == "poisson" else batch
    capacity = int(devices * math.ceil(capacity / devices))  # the batch splits over the devices
    if capacity < batch:
        raise ConfigError(f"--config.privacy.capacity={capacity} is below the expected batch of {batch} rows")
    microbatch = int(p.get("microbatch", 0))
    if microbatch < 0 or (microbatch and capacity % microbatch):
        raise ConfigError(f"--config.privacy.microbatch={microbatch} must divide the batch of {capacity} rows")
    delta = float(p.get("delta", 0.0)) or 1.0 / (10 * num_examples)
    out = Plan(clip_norm=clip, noise_multiplier=float(p.get("noise_multiplier", 1.0)), delta=delta,
               num_examples=int(num_examples), batch_size=batch, capacity=capacity,
               num_steps=int(config.train.num_steps), sampling=sampling, microbatch=microbatch)
    target = float(p.get("target_epsilon", 0.0))
    if target > 0:
        from jax_privacy.accounting import calibrate

        sigma = calibrate.calibrate_noise_multiplier(
            target_epsilon=target, accountant=_Sampled(out), batch_sizes=batch, num_updates=out.num_steps,
            num_samples=out.num_examples, target_delta=delta, tol=1e-3)
        # the calibration's tolerance is on sigma: step up until the epsilon is within the target
        while out.__class__(**{**dataclasses.asdict(out), "noise_multiplier": sigma}).epsilon(out.num_steps) > target:
            sigma *= 1.001
        out = dataclasses.replace(out, noise_multiplier=float(sigma), target_epsilon=target)
    elif out.noise_multiplier < 0:
        raise ConfigError(f"--config.privacy.noise_multiplier={out.noise_multiplier} must be >= 0")
    return out


class _Sampled:
    """jax-privacy's calibration asks an accountant for epsilon at given DpParams without our sampling
    method and truncation: this one computes the epsilon of `plan` with the asked noise multiplier."""

    def __init__(self, base: Plan):
        self._base = base

    def can_calibrate_noise_multipliers(self) -> bool:
        return True

    def compute_epsilon(self, num_updates, dp_params) -> float:
        return float(accountant().compute_epsilon(int(num_updates), self._base._params(dp_params.noise_multipliers)))


def privatizer(plan: Plan, seed: int):
    """The optax transformation that turns the sum of clipped gradients into DP-SGD's noisy mean: Gaussian
    noise of std sigma * C (jax-privacy's Gaussian privatizer, its key in the optimizer state), then 1 / B."""
    import jax
    import optax
    from jax_privacy import noise_addition

    noise = noise_addition.gaussian_privatizer(stddev=plan.noise_std,
                                               prng_key=jax.random.fold_in(jax.random.PRNGKey(seed), 0xD9))
    return optax.chain(noise, optax.scale(1.0 / plan.batch_size))
