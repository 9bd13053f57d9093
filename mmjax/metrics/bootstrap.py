"""Patient-level bootstrap: confidence intervals for every metric, and paired differences between
two runs on the same rows.

A resample draws patients with replacement (all of a patient's rows go together) and is applied
as integer counts: row i weighs the number of times its patient was drawn. Every metric in
`mmjax.metrics` takes such counts for R resamples at once ([R, N] `sample_weight`), so the
bootstrap is vectorized over resamples (in chunks that bound memory), not a Python loop over them,
and each resample's value is exactly the metric of the resampled rows.

Intervals are percentile intervals (Efron & Tibshirani, 1993) of the resampled values; a
resample on which a metric is undefined (e.g. no positive drawn) is left out of that metric's
interval and counted in `undefined`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000


def group_index(groups) -> tuple[np.ndarray, int]:
    """Each row's group (patient) as 0..G-1, and G."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inverse = inverse.ravel()
    return inverse, (int(inverse.max()) + 1 if len(inverse) else 0)


def first_rows(groups) -> tuple[np.ndarray, np.ndarray]:
    """(each group's first row [G], each row's group as 0..G-1 [N]), groups in `group_index`'s order."""
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    return first, inverse.ravel()


def draw_counts(rng: np.random.Generator, inverse: np.ndarray, num_groups: int, num_resamples: int) -> np.ndarray:
    """[r, N] float counts: how often each row's group is drawn in each of r resamples of the G groups
    with replacement. Draws r x G integers in order, so successive calls continue one stream."""
    draws = rng.integers(0, num_groups, size=(num_resamples, num_groups))
    offsets = np.arange(num_resamples)[:, None] * num_groups
    counts = np.bincount((draws + offsets).ravel(), minlength=num_resamples * num_groups)
    return counts.reshape(num_resamples, num_groups)[:, inverse].astype(np.float64)


def _stack(trees: list):
    """Concatenates the [r] arrays at the leaves of same-structured trees; other leaves from the first."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([t[k] for t in trees]) for k in first}
    if isinstance(first, np.ndarray) and first.ndim >= 1:
        return np.concatenate(trees)
    return first


def resample(fn: Callable[[np.ndarray], dict], groups, num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
             chunk: int = 0) -> dict:
    """`fn(counts [r, N]) -> tree of [r] arrays` over all R resamples: the same tree with [R] leaves.
    `chunk` resamples at a time (0: as many as keep a chunk's counts near 64 MB)."""
    inverse, num_groups = group_index(groups)
    chunk = chunk or max(1, min(num_resamples, (8 << 20) // max(len(inverse), 1)))
    rng = np.random.default_rng(seed)
    parts = [fn(draw_counts(rng, inverse, num_groups, min(chunk, num_resamples - start)))
             for start in range(0, num_resamples, chunk)]  # the same resamples whatever the chunk size
    return _stack(parts)


def interval(values: np.ndarray, level: float = 0.95) -> dict:
    """Percentile interval of resampled values (NaN ones left out and counted)."""
    values = np.asarray(values, np.float64)
    ok = values[~np.isnan(values)]
    if not len(ok):
        return {"low": float("nan"), "high": float("nan"), "undefined": int(len(values))}
    low, high = np.percentile(ok, [50 * (1 - level), 50 * (1 + level)])
    return {"low": float(low), "high": float(high), "undefined": int(len(values) - len(ok))}


def intervals(boot, level: float = 0.95):
    """The tree of resampled [R] values as a tree of {'low', 'high', 'undefined'} (other leaves dropped)."""
    if isinstance(boot, dict):
        out = {k: intervals(v, level) for k, v in boot.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(boot, np.ndarray) and boot.ndim == 1:
        return interval(boot, level)
    return None


def paired_difference(a: np.ndarray, b: np.ndarray, observed: float, level: float = 0.95) -> dict:
    """a - b on the same resamples: the observed difference, its percentile interval and a two-sided
    bootstrap p-value for 'no difference' (twice the smaller tail of the resampled differences
    around 0, at least 1 / (R + 1)), and R, the resamples where both are defined."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[~np.isnan(d)]
    if not len(d):
        return {"difference": observed, "low": float("nan"), "high": float("nan"), "p_value": float("nan")}
    tail = min(np.mean(d <= 0), np.mean(d >= 0))
    return {"difference": observed, **{k: v for k, v in interval(d, level).items() if k != "undefined"},
            "p_value": float(min(1.0, max(2 * tail, 1.0 / (len(d) + 1)))), "resamples": int(len(d))}
