r"""Simulated ECG rhythms: a small manifest dataset for the small-data signal work (issue 21).

    python -m mmjax.data.synthetic.rhythms --out=DIR [--patients=200] [--rate=500] [--seed=0]
    python launch.py --config=experiments/manifest.py --config.data.manifest=DIR/manifest.csv \
        --config.data.schema=DIR/schema.yaml --config.data.folds=5 --workdir=W

Writes `DIR/records/<id>.npy` (10 s of 12 leads, float32; `--leads=1`: one lead), `DIR/manifest.csv`
(id, ecg, age, sex, rhythm) and `DIR/schema.yaml`: a manifest dataset like a real study's, with a few
hundred patients and one dominant class. ECGs come from neurokit2's 12-lead ECGSYN model (McSharry et
al. 2003) with each patient's own wave amplitudes and the noise of real recordings (`simulate`):

| rhythm | share | heart rate (bpm) | beat-to-beat variation | P wave |
|---|---|---|---|---|
| sinus rhythm | 72.5% | 60-100 | heart_rate_std 1-4 bpm (a quarter: 4-8, sinus arrhythmia) | yes |
| sinus bradycardia | 10% | 40-59 | as sinus rhythm | yes |
| sinus tachycardia | 10% | 101-150 | as sinus rhythm | yes |
| atrial fibrillation | 7.5% | 70-130 | 12-35 bpm (irregular R-R) | none; 4-8 Hz f-waves |

(the held-back set of the issue: 145 of 200 sinus). Age and sex are drawn with atrial fibrillation
older on average (a weak tabular cue, as in real cohorts). The rhythm is defined by the R-R
sequence, so an R-R feature baseline (`mmjax/evaluation/baselines.py`) should separate the classes:
the question is whether mmjax's signal path learns it from a few hundred patients.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

RHYTHMS = ("sinus rhythm", "sinus bradycardia", "sinus tachycardia", "atrial fibrillation")
SHARES = (0.725, 0.10, 0.10, 0.075)
_RATE_RANGE = {0: (60, 100), 1: (40, 59), 2: (101, 150), 3: (70, 130)}
# ECGSYN's wave amplitudes (P, Q, R, S, T); atrial fibrillation has no P wave
_AMPLITUDES = {"sinus": (1.2, -5.0, 30.0, -7.5, 0.75), "af": (0.0, -5.0, 30.0, -7.5, 0.75)}
SCHEMA = """name: rhythms
id: id
modalities:
  ecg: {{kind: signal, column: ecg, rate: {rate}, seconds: 10, channels: {channels}}}
  demographics: {{kind: tabular, numeric: [age], categorical: [sex]}}
tasks:
  rhythm: {{kind: multiclass, column: rhythm}}
"""


_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def simulate(cls: int, rate: int, rng: np.random.Generator, seconds: float = 10.0, leads: int = 12) -> np.ndarray:
    """One ECG of rhythm class `cls` (an index into `RHYTHMS`): [rate * seconds, 12] float32 in mV-like units
    ([rate * seconds] with `leads=1`).

    `leads=12`: ECGSYN's 12-lead model with what makes real recordings hard: each patient's own wave
    amplitudes (+-40% per wave and lead), sinus arrhythmia in a quarter of the sinus records (heart_rate_std
    up to 8 bpm, so 'irregular' is not 'atrial fibrillation' alone), fibrillatory f-waves (4-8 Hz) in place of
    P waves, baseline wander, mains hum, muscle noise and an electrode-motion step on some leads, and a
    per-record gain. `leads=1`: one lead with white noise and baseline wander only (like the first version
    of this module, which the default model learned perfectly; not its exact random stream).
    """
    import neurokit2 as nk

    low, high = _RATE_RANGE[cls]
    heart_rate = float(rng.uniform(low, high))
    af = cls == 3
    if af:
        std = float(rng.uniform(12, 35))
    else:
        std = float(rng.uniform(4, 8) if rng.random() < 0.25 else rng.uniform(1, 4))
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    ai = np.asarray(_AMPLITUDES["af" if af else "sinus"], np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if leads == 1:
            x = nk.ecg_simulate(duration=seconds, sampling_rate=rate, heart_rate=heart_rate, heart_rate_std=std,
                                noise=float(rng.uniform(0.01, 0.08)), method="ecgsyn",
                                random_state=int(rng.integers(2**31)), ai=list(ai))
            wander = 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 2 * np.pi))  # breathing
            return (np.asarray(x, np.float64) * rng.uniform(0.6, 1.4) + wander).astype(np.float32)
        if leads != 12:
            raise ValueError(f"leads must be 1 or 12, not {leads}")
        x = nk.ecg_simulate(duration=seconds, sampling_rate=rate, heart_rate=heart_rate, heart_rate_std=std,
                            noise=0.0, method="multileads", random_state=int(rng.integers(2**31)),
                            ai=list(ai * rng.uniform(0.6, 1.4, 5)))
    x = np.asarray(x, np.float64)[:n] * rng.uniform(0.6, 1.4, (1, 12))  # each lead's own amplitude
    if af:  # fibrillatory waves, strongest in V1 and the inferior leads
        f = rng.uniform(4, 8)
        phase = np.cumsum(2 * np.pi * (f + 0.5 * rng.standard_normal(n)) / rate)
        x += np.outer(0.03 * np.sin(phase), rng.uniform(0.3, 1.5, 12))
    breathing = rng.uniform(0.1, 0.4)
    x += rng.uniform(0.05, 0.3, 12) * np.sin(2 * np.pi * breathing * t[:, None] + rng.uniform(0, 2 * np.pi, 12))
    mains = rng.choice([50.0, 60.0])
    x += rng.uniform(0, 0.05) * np.sin(2 * np.pi * mains * t[:, None] + rng.uniform(0, 2 * np.pi, 12))
    x += rng.uniform(0.005, 0.04) * rng.standard_normal((n, 12))  # muscle noise (white at these rates)
    for lead in rng.choice(12, size=int(rng.integers(0, 3)), replace=False):  # electrode motion: a step that decays
        start = int(rng.integers(n))
        x[start:, lead] += rng.uniform(-1, 1) * np.exp(-(t[start:] - t[start]) / rng.uniform(0.2, 1.0))
    return (x * rng.uniform(0.5, 2.0)).astype(np.float32)


def write(out: str, patients: int = 200, rate: int = 500, seed: int = 0, leads: int = 12, log=print) -> dict:
    """Writes the dataset to `out`; returns {'manifest', 'schema', 'counts'}."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    counts = np.floor(np.asarray(SHARES) * patients).astype(int)
    counts[0] += patients - counts.sum()
    classes = rng.permutation(np.repeat(np.arange(len(RHYTHMS)), counts))
    os.makedirs(os.path.join(out, "records"), exist_ok=True)
    rows = []
    for i, cls in enumerate(classes):
        pid = f"r{i:04d}"
        np.save(os.path.join(out, "records", f"{pid}.npy"), simulate(int(cls), rate, rng, leads=leads))
        age = float(np.clip(rng.normal(72 if cls == 3 else 58, 12), 18, 95))
        rows.append({"id": pid, "ecg": f"records/{pid}.npy", "age": round(age, 1), "sex": "FM"[int(rng.random() < 0.5)],
                     "rhythm": RHYTHMS[int(cls)]})
        if log and (i + 1) % 50 == 0:
            log(f"{i + 1}/{patients} ECGs simulated")
    manifest = os.path.join(out, "manifest.csv")
    pd.DataFrame(rows).to_csv(manifest, index=False)
    schema = os.path.join(out, "schema.yaml")
    with open(schema, "w") as f:
        f.write(SCHEMA.format(rate=rate, channels=leads))
    return {"manifest": manifest, "schema": schema, "counts": dict(zip(RHYTHMS, counts.tolist()))}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmjax.data.synthetic.rhythms", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leads", type=int, default=12, choices=(1, 12))
    args = parser.parse_args(argv)
    done = write(args.out, args.patients, args.rate, args.seed, args.leads)
    print(f"Wrote {done['manifest']} and {done['schema']}: {done['counts']}")
    return done


if __name__ == "__main__":
    main()
