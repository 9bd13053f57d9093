"""Calibration and operating points of binary outputs (each binary task, each label of a multilabel
task).

- Expected calibration error: `sum_b n_b / N * |mean(p) - mean(y)|` over `bins` equal-width bins
  of the predicted probability (Naeini et al., 2015; Guo et al., 2017), the Brier score
  `mean((p - y)^2)` and the reliability-diagram data (per bin: count, mean predicted, observed).
- Temperature scaling (Guo et al., 2017): one scalar T per task (over all its labels' known
  entries) fitted on validation by maximum likelihood, `p' = sigmoid(logit(p) / T)`, T searched in
  [e^-4, e^4] (a value at a bound is flagged); the logits are recovered from the stored float
  probabilities (clipped at 1e-7), which is exact away from saturation. A multiclass task gets one T
  on its softmax, `p' = softmax(log p / T)`, and its ECE and reliability are of the top-label
  confidence (max p against whether the argmax is right); its Brier score sums over the classes.
- Operating points: a threshold chosen on validation, by Youden's J (max sensitivity +
  specificity - 1) or as the highest threshold reaching a target sensitivity, and sensitivity,
  specificity, PPV and NPV at it on another split.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

_EPS = 1e-7


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(x, np.float64)))


def reliability(y, p, bins: int = 10) -> dict:
    """Per equal-width bin of p: count, mean predicted probability and observed positive fraction
    (NaN for an empty bin); the last bin includes 1."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_p = np.bincount(index, p, minlength=bins) / count
        observed = np.bincount(index, y, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.astype(int).tolist(),
            "mean_predicted": mean_p.tolist(), "observed": observed.tolist()}


def ece(y, p, bins: int = 10) -> float:
    r = reliability(y, p, bins)
    count = np.asarray(r["count"], np.float64)
    gap = np.abs(np.nan_to_num(np.asarray(r["mean_predicted"]) - np.asarray(r["observed"])))
    return float(np.sum(count * gap) / max(count.sum(), 1))


def brier(y, p) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def fit_temperature(y, p) -> float:
    """T > 0 minimizing the binary cross-entropy of sigmoid(logit(p) / T) on (y, p)."""
    z, y = logit(p), np.asarray(y, np.float64)

    def nll(log_t):
        q = np.clip(sigmoid(z / np.exp(log_t)), _EPS, 1 - _EPS)
        return -np.mean(y * np.log(q) + (1 - y) * np.log1p(-q))

    return float(np.exp(optimize.minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded",
                                                 options={"xatol": 1e-6}).x))


def scale(p, temperature: float) -> np.ndarray:
    return sigmoid(logit(p) / temperature)


def scale_multiclass(p, temperature: float) -> np.ndarray:
    """softmax(log p / T) over the last axis."""
    z = np.log(np.clip(np.asarray(p, np.float64), _EPS, 1.0)) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def fit_temperature_multiclass(y, p) -> float:
    """T > 0 minimizing the cross-entropy of softmax(log p / T) for class indices y."""
    y = np.asarray(y, np.int64)

    def nll(log_t):
        q = scale_multiclass(p, np.exp(log_t))
        return -np.mean(np.log(np.clip(q[np.arange(len(y)), y], _EPS, 1.0)))

    return float(np.exp(optimize.minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded",
                                                 options={"xatol": 1e-6}).x))


def multiclass_calibration(y, p, bins: int = 10) -> dict:
    """Top-label ECE and reliability (confidence max p vs accuracy) and the multiclass Brier score
    (sum over classes of (p_k - [y = k])^2, averaged over rows)."""
    y, p = np.asarray(y, np.int64), np.asarray(p, np.float64)
    correct = (p.argmax(1) == y).astype(np.float64)
    confidence = p.max(1)
    onehot = np.eye(p.shape[1])[y]
    return {"ece": ece(correct, confidence, bins), "brier": float(np.mean(np.sum((p - onehot) ** 2, 1))),
            "reliability": reliability(correct, confidence, bins)}


def choose_threshold(y, p, rule: str = "youden", target_sensitivity: float = 0.9) -> float:
    """A threshold on p (predict positive when p >= t) from (y, p): `youden` maximizes sensitivity +
    specificity - 1; `sensitivity` is the highest t whose sensitivity is >= `target_sensitivity`."""
    y, p = np.asarray(y, bool), np.asarray(p, np.float64)
    if y.all() or not y.any():
        raise ValueError("choosing a threshold needs positives and negatives")
    candidates = np.unique(p)[::-1]  # descending: sensitivity grows along it
    tp, fp = _counts_at(p[y], candidates), _counts_at(p[~y], candidates)
    sens, spec = tp / y.sum(), 1 - fp / (~y).sum()
    if rule == "youden":
        return float(candidates[np.argmax(sens + spec - 1)])
    if rule == "sensitivity":
        return float(candidates[np.argmax(sens >= target_sensitivity)])
    raise ValueError(f"operating point rule {rule!r}: use 'youden' or 'sensitivity'")


def _counts_at(values, thresholds_desc) -> np.ndarray:
    """How many `values` are >= each threshold (thresholds in descending order)."""
    return len(values) - np.searchsorted(np.sort(values), thresholds_desc, side="left")


def at_threshold(y, p, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV (NaN when undefined) and counts at `threshold`."""
    y, hard = np.asarray(y, bool), np.asarray(p, np.float64) >= threshold
    tp, fp = int(np.sum(hard & y)), int(np.sum(hard & ~y))
    fn, tn = int(np.sum(~hard & y)), int(np.sum(~hard & ~y))
    div = lambda a, b: a / b if b else float("nan")
    return {"threshold": float(threshold), "sensitivity": div(tp, tp + fn), "specificity": div(tn, tn + fp),
            "ppv": div(tp, tp + fp), "npv": div(tn, tn + fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def binary_outputs(preds: dict, labels: dict, masks: dict, tasks,
                   one_vs_rest: bool = False) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(output name, task name, y, p) over known rows of every binary output: a binary task ('task'),
    each label of a multilabel task ('task.label'); with `one_vs_rest` also each class of a
    multiclass task ('task.class': that class against the others)."""
    out = []
    for t in tasks:
        if t.kind == "binary":
            known = masks[t.name]
            out.append((t.name, t.name, labels[t.name][known], preds[t.name][known]))
        elif t.kind == "multilabel":
            for k, name in enumerate(t.label_names):
                known = masks[t.name][:, k]
                out.append((f"{t.name}.{name}", t.name, labels[t.name][known, k], preds[t.name][known, k]))
        elif t.kind == "multiclass" and one_vs_rest:
            known = masks[t.name]
            for k, name in enumerate(t.label_names):
                out.append((f"{t.name}.{name}", t.name, (labels[t.name][known] == k).astype(np.float64),
                            preds[t.name][known, k]))
    return out


def summary(collected, tasks, reference=None, bins: int = 10, rule: str = "youden",
            target_sensitivity: float = 0.9) -> dict:
    """{'calibration': {output: ...}, 'temperature': {task: T}, 'operating_points': {output: ...}} on
    `collected` (preds, labels, masks, ...); temperatures and thresholds are fitted on `reference`
    (the validation split's) when given, else on `collected` itself (said in 'fitted_on')."""
    fit = reference if reference is not None else collected
    fitted_on = "reference" if reference is not None else "self"
    outputs = binary_outputs(*collected[:3], tasks)
    fit_outputs = {name: (y, p) for name, _, y, p in binary_outputs(*fit[:3], tasks)}
    temperatures = {}
    for task in dict.fromkeys(task for _, task, _, _ in outputs):  # per task: all its labels' known entries
        ys = np.concatenate([y for name, t, _, _ in outputs if t == task for y in [fit_outputs[name][0]]])
        ps = np.concatenate([p for name, t, _, _ in outputs if t == task for p in [fit_outputs[name][1]]])
        temperatures[task] = fit_temperature(ys, ps) if len(np.unique(ys)) == 2 else float("nan")
    calib, points = {}, {}
    at_bound = sorted(t for t, v in temperatures.items() if v == v and abs(np.log(v)) > 3.99)
    for name, task, y, p in outputs:
        scaled = scale(p, temperatures[task]) if temperatures[task] == temperatures[task] else p
        calib[name] = {"ece": ece(y, p, bins), "brier": brier(y, p), "ece_scaled": ece(y, scaled, bins),
                       "brier_scaled": brier(y, scaled), "reliability": reliability(y, p, bins),
                       "reliability_scaled": reliability(y, scaled, bins)}
        fy, fp = fit_outputs[name]
        try:
            threshold = choose_threshold(fy, fp, rule, target_sensitivity)
        except ValueError as e:
            points[name] = {"error": str(e)}
            continue
        points[name] = {"rule": rule, **({"target_sensitivity": target_sensitivity} if rule == "sensitivity" else {}),
                        **at_threshold(y, p, threshold)}
    for t in tasks:  # multiclass: top-label calibration, one temperature on the softmax
        if t.kind != "multiclass":
            continue
        known, fit_known = collected[2][t.name], fit[2][t.name]
        y, p = collected[1][t.name][known].astype(np.int64), collected[0][t.name][known]
        fy, fp = fit[1][t.name][fit_known].astype(np.int64), fit[0][t.name][fit_known]
        if not len(y) or len(np.unique(fy)) < 2:
            continue
        temperature = fit_temperature_multiclass(fy, fp)
        temperatures[t.name] = temperature
        raw, scaled = multiclass_calibration(y, p, bins), multiclass_calibration(y, scale_multiclass(p, temperature),
                                                                                 bins)
        calib[t.name] = {**raw, "ece_scaled": scaled["ece"], "brier_scaled": scaled["brier"],
                         "reliability_scaled": scaled["reliability"], "top_label": True}
        if abs(np.log(temperature)) > 3.99:
            at_bound.append(t.name)
    return {"calibration": calib, "temperature": temperatures, "temperature_at_bound": at_bound,
            "operating_points": points, "fitted_on": fitted_on, "bins": bins}
