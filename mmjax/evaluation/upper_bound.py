"""Reference upper bounds for `synthetic_patients`: what a model given the true evidence reaches.

A logistic regression with all pairwise feature products (so AND-type evidence like 'infection
and organ dysfunction' is expressible) is fitted on the training split's *latent evidence*: the
visible opacity, cardiothoracic ratio and effusion size behind each image, the symptoms each note
reports, the lab values before missingness, and the rhythm, ectopy and rate behind each ECG.
It is scored on the test split, per modality alone and for all modalities together, once with
every modality present and once with the dataset's missingness (absent modalities' evidence
zeroed, presence flags as features). A learned model sees the same information only through
rendering noise, so these are ceilings, not targets.

    python -m mmjax.evaluation.upper_bound [--config=default] [--json=out.json]
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from mmjax.console import run
from mmjax.data.synthetic.builder import SyntheticPatients
from mmjax.data.synthetic.generate import MODALITIES, generate_split
from mmjax.data.synthetic.labs import FEATURES
from mmjax.data.synthetic.latent import CONDITIONS
from mmjax.metrics import roc_auc


def _features(evidence, columns, modalities, with_missing):
    blocks = []
    log_scale = np.array([f.log_scale for f in FEATURES])
    for m in modalities:
        x = evidence[m]
        if m == "tabular":
            x = np.where(log_scale, np.log(x), x)
        if with_missing:
            present = columns["present"][m][:, None]
            x = np.concatenate([x * present, present], axis=1)
        blocks.append(x)
    blocks.append(np.stack([columns["age"], columns["female"]], axis=1))
    return np.concatenate(blocks, axis=1).astype(np.float64)


def _expand(x, mean, std):
    z = (x - mean) / std
    i, j = np.triu_indices(z.shape[1])
    return np.concatenate([np.ones((len(z), 1)), z, z[:, i] * z[:, j]], axis=1)


def fit_logistic(x, y, l2=1.0, steps=25):
    """Newton's method (IRLS) for L2-regularized logistic regression; returns weights."""
    w = np.zeros(x.shape[1])
    reg = l2 * np.eye(x.shape[1])
    reg[0, 0] = 0.0  # no penalty on the intercept
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def upper_bounds(config_name: str = "default") -> dict:
    cfg = next(c for c in SyntheticPatients.BUILDER_CONFIGS if c.name == config_name)
    train = generate_split(cfg.settings, "train", cfg.split_sizes["train"], with_evidence=True)
    test = generate_split(cfg.settings, "test", cfg.split_sizes["test"], with_evidence=True)
    out = {}
    for with_missing in (False, True):
        key = "with_missingness" if with_missing else "all_present"
        out[key] = {}
        for name, mods in [(m, (m,)) for m in MODALITIES] + [("all", MODALITIES)]:
            xtr = _features(train[2], train[0], mods, with_missing)
            xte = _features(test[2], test[0], mods, with_missing)
            mean, std = xtr.mean(0), xtr.std(0) + 1e-9
            xtr, xte = _expand(xtr, mean, std), _expand(xte, mean, std)
            aucs = {}
            for k, cond in enumerate(CONDITIONS):
                w = fit_logistic(xtr, train[0]["diagnosis"][:, k])
                aucs[cond] = round(roc_auc(test[0]["diagnosis"][:, k], xte @ w), 4)
            out[key][name] = {"macro_auroc": round(float(np.mean(list(aucs.values()))), 4), "auroc": aucs}
    return out


def main(argv):
    del argv
    result = upper_bounds(flags.FLAGS.config)
    for key, rows in result.items():
        print(f"\n{key}: test macro-AUROC (per condition: {', '.join(CONDITIONS)})")
        for name, r in rows.items():
            print(f"  {name:8s} {r['macro_auroc']:.3f}   " + " ".join(f"{v:.3f}" for v in r["auroc"].values()))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    flags.DEFINE_string("config", "default", "synthetic_patients builder config.")
    flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
    run(main)
