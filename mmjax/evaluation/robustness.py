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
import zlib

import numpy as np

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
    from mmjax.evaluation.evaluate import id_codes

    codes = id_codes([f"{i}\x00{modality}" for i in np.asarray(ids).ravel()])
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
