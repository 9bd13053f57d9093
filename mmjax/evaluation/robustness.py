"""Robustness to missing and noisy modalities, and exact Shapley values over modalities.

All of it comes from running the trained model on altered copies of the evaluation batches:

- subsets: every subset of the modalities present (the others marked absent, which the model
  excludes exactly), 2^M passes; the metrics of each.
- missing fraction: one modality removed for a fraction f of the patients (0 to 100%; the same
  patients at every f that contains them, chosen by a hash of the patient id and modality).
- noise: Gaussian noise of standard deviation sigma added to one modality's real input values, in
  the model's input units (images standardized per channel, tabular standardized, signals
  normalized, or their log-spectrogram with `data.spectrogram`); not for text (token ids).
- Shapley values (Shapley, 1953), exact over the 2^M subsets, M <= 6: per patient and output, the
  value of a coalition S is the model's prediction with only S present, so the values of a patient
  sum to (all present) - (none present) (efficiency); and on the metrics, the value of S is the
  metric with only S present. Leave-one-modality-out deltas beside them. With more than 6
  modalities only each modality alone and each left out are run (no Shapley values).
"""

from __future__ import annotations

import itertools
import math
import os
import zlib

import numpy as np

from mmjax.evaluation.records import dump_json
from mmjax.experiment import EVAL_DIR
from mmjax.metrics import tasks as task_metrics

MAX_SHAPLEY_MODALITIES = 6


def subsets(names) -> list[tuple[str, ...]]:
    """Every subset of `names` (in their order), from the empty one to all."""
    names = tuple(names)
    return [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


def hide(batch: dict, absent, rows=None) -> dict:
    """A copy of `batch` with the `absent` modalities marked absent (for `rows` only, a bool [B], or all)."""
    out = dict(batch)
    for m in absent:
        present = np.asarray(batch[m]["present"], bool)
        out[m] = {**batch[m], "present": present & ~rows if rows is not None else np.zeros_like(present)}
    return out


def add_noise(batch: dict, modality: str, sigma: float, seed) -> dict:
    """A copy of `batch` with N(0, sigma^2) added to `modality`'s values where they are real; the draw
    depends on `seed` and the batch's patient ids (so every batch gets its own noise, reproducibly)."""
    entry = batch[modality]
    values = np.asarray(entry["values"], np.float32)
    key = zlib.crc32("\x00".join(map(str, np.asarray(batch["patient_id"]).ravel())).encode())
    rng = np.random.default_rng([*np.ravel(seed), key])
    noise = rng.normal(0.0, sigma, values.shape).astype(np.float32)
    if "mask" in entry:  # [B, T] or [B, F]: per position
        mask = np.asarray(entry["mask"], bool)
        noise *= mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return {**batch, modality: {**entry, "values": values + noise}}


def patient_fraction(ids, modality: str) -> np.ndarray:
    """A number in [0, 1) per row from a hash of (patient id, modality): rows below f are the f-fraction."""
    codes = task_metrics.id_codes([f"{i}\x00{modality}" for i in np.asarray(ids).ravel()])
    return codes.view(np.uint64) / 2.0**64


def shapley_weights(m: int) -> np.ndarray:
    """|S|!(M-|S|-1)!/M! for |S| = 0..M-1."""
    return np.array([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)])


def shapley(values: dict, names) -> dict:
    """Exact Shapley values of the game `values[S]` (S a subset tuple of `names`; values arrays of one
    shape, e.g. [N] predictions or a scalar metric): {modality: array of that shape}."""
    names = tuple(names)
    if len(names) > MAX_SHAPLEY_MODALITIES:
        raise ValueError(f"exact Shapley values over {len(names)} modalities need 2^{len(names)} passes; "
                         f"at most {MAX_SHAPLEY_MODALITIES}")
    w = shapley_weights(len(names))
    key = {frozenset(s): s for s in values}
    out = {}
    for m in names:
        total = 0.0
        for s in subsets(tuple(n for n in names if n != m)):
            with_m = key[frozenset(s) | {m}]
            total = total + w[len(s)] * (np.asarray(values[with_m], np.float64) - np.asarray(values[key[frozenset(s)]],
                                                                                            np.float64))
        out[m] = total
    return out


def analyze(predictor, split: str = "test", fractions=(0.0, 0.25, 0.5, 0.75, 1.0), sigmas=(0.1, 0.3, 1.0),
            seed: int = 0) -> dict:
    """Robustness (every subset of modalities, missing fractions, noise) and Shapley values over
    modalities (this module); writes `eval/<split>_robustness.json` and the
    per-patient values to `eval/<split>_shapley.npz`."""
    names = tuple(predictor.modalities)
    os.makedirs(os.path.join(predictor.workdir, EVAL_DIR), exist_ok=True)
    cached = list(predictor.batches(split))  # every pass below reuses these host batches
    kinds = {m.name: m.kind for m in predictor.spec.select_modalities(names)}
    metric = lambda c: task_metrics.compute_metrics(*c[:3], predictor.tasks)
    exact = len(names) <= MAX_SHAPLEY_MODALITIES
    chosen = subsets(names) if exact else [()] + [(m,) for m in names] + [
        tuple(n for n in names if n != m) for m in names] + [names]  # > 6: alone and left out only
    collected = by_subset(predictor, cached, chosen)
    ids = collected[names][3]
    metrics = {s: metric(c) for s, c in collected.items()}
    flat = {s: dict(task_metrics.flat_metrics(m)) for s, m in metrics.items()}
    real = [np.asarray(b["example_mask"], bool) for b in cached]
    count = {m: int(sum(np.asarray(b[m]["present"], bool)[r].sum() for b, r in zip(cached, real))) for m in names}
    out = {"split": split, "step": predictor.step, "modalities": list(names),
           "presence": {"patients": int(sum(r.sum() for r in real)), "present": count},
           "subsets": [{"present": list(s), "metrics": flat[s]} for s in collected],
           "leave_one_out": {m: {k: flat[names][k] - flat[tuple(n for n in names if n != m)][k]
                                 for k in flat[names]} for m in names}}
    keys = list(flat[names])
    game = {s: np.array([flat[s][k] for k in keys]) for s in collected}
    if exact:
        values = shapley(game, names)
        out["shapley_metrics"] = {m: dict(zip(keys, v.tolist())) for m, v in values.items()}
        phi, columns, game = patient_shapley(predictor, collected)  # [N, M, C]
        per_patient = {m: phi[:, j] for j, m in enumerate(names)}
        out["shapley"] = {"outputs": columns, "mean_abs": {m: dict(zip(columns, np.abs(per_patient[m]).mean(0)
                                                                           .tolist())) for m in names},
                          "mean": {m: dict(zip(columns, per_patient[m].mean(0).tolist())) for m in names}}
        np.savez_compressed(os.path.join(predictor.workdir, EVAL_DIR, f"{split}_shapley.npz"),
                            patient_id=ids.astype(str), values=phi, modalities=np.array(names),
                            outputs=np.array(columns),
                            full=game[names], empty=game[()])

    def score(transform) -> dict:
        return dict(task_metrics.flat_metrics(metric(predictor.collect(cached, transform))))

    out["missing_fraction"] = {m: [{"fraction": f, "metrics": score(
        lambda b, m=m, f=f: hide(b, [m], patient_fraction(b["patient_id"], m) < f))}
        for f in fractions] for m in names}
    out["noise"] = {m: [{"sigma": sg, "metrics": score(
        lambda b, m=m, sg=sg, i=i: add_noise(b, m, sg, (seed, i)))} for sg in sigmas]
        for i, m in enumerate(names) if kinds[m] != "text"}
    dump_json(out, os.path.join(predictor.workdir, EVAL_DIR, f"{split}_robustness.json"))
    return out


def by_subset(predictor, batches, subsets) -> dict:
    """{present modalities: collected predictions} with the other modalities hidden, per subset."""
    names = set(predictor.modalities)
    return {s: predictor.collect(batches, lambda b, s=s: hide(b, names - set(s))) for s in dict.fromkeys(subsets)}


def patient_shapley(predictor, collected) -> tuple[np.ndarray, list[str], dict]:
    """(values [N, modalities, outputs], output names, game): exact Shapley values of every output
    (probabilities; a regression's value) per patient, from `collected` (`by_subset` over every subset)."""
    outputs, columns = output_columns(predictor.tasks)
    game = {s: np.concatenate([_columns(c[0][t]) for t in outputs], 1) for s, c in collected.items()}
    values = shapley(game, tuple(predictor.modalities))  # {m: [N, C]}
    return np.stack([values[m] for m in predictor.modalities], 1), columns, game


def output_columns(tasks) -> tuple[list[str], list[str]]:
    """The tasks with per-patient outputs and a name per output column ('task' or 'task.label')."""
    columns = []
    for t in tasks:
        if t.kind in ("binary", "regression"):
            columns.append(t.name)
        else:
            columns += [f"{t.name}.{n}" for n in t.label_names]
    return [t.name for t in tasks], columns


def _columns(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x
