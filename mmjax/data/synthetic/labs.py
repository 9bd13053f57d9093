"""Lab values and vital signs (the tabular modality) generated from the latent state.

Each feature has a unit, a plausible range it is clipped to, a rate at which it is not measured
(stored as NaN), and whether its distribution is skewed enough to be log-transformed before
standardization. Correlations come from the shared latent state (infection raises WBC, CRP and
temperature together) and from shared noise (creatinine and potassium).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.synthetic.latent import PatientState


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    low: float
    high: float
    missing_rate: float
    log_scale: bool = False


FEATURES = (
    Feature("wbc", "10^9/L", 1.0, 40.0, 0.08, log_scale=True),
    Feature("crp", "mg/L", 0.5, 400.0, 0.15, log_scale=True),
    Feature("lactate", "mmol/L", 0.4, 12.0, 0.3, log_scale=True),
    Feature("creatinine", "mg/dL", 0.3, 8.0, 0.08, log_scale=True),
    Feature("bnp", "pg/mL", 5.0, 5000.0, 0.35, log_scale=True),
    Feature("troponin", "ng/L", 1.0, 500.0, 0.3, log_scale=True),
    Feature("sodium", "mmol/L", 118.0, 155.0, 0.06),
    Feature("potassium", "mmol/L", 2.5, 7.0, 0.06),
    Feature("hemoglobin", "g/dL", 6.0, 19.0, 0.06),
    Feature("platelets", "10^9/L", 20.0, 600.0, 0.08, log_scale=True),
    Feature("glucose", "mg/dL", 50.0, 450.0, 0.1, log_scale=True),
    Feature("temperature", "degC", 34.5, 41.5, 0.02),
    Feature("heart_rate", "bpm", 35.0, 190.0, 0.02),
    Feature("respiratory_rate", "breaths/min", 8.0, 45.0, 0.04),
    Feature("systolic_bp", "mmHg", 60.0, 220.0, 0.02),
    Feature("spo2", "%", 70.0, 100.0, 0.03),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)


def measure_labs(s: PatientState, rng: np.random.Generator, missing_scale: float = 1.0):
    """Returns f32[N, len(FEATURES)] with NaN where a value was not measured."""
    n = len(s.age)
    z = lambda: rng.standard_normal(n)
    a = (s.age - 63.0) / 16.0
    infection = s.pneumonia | s.uti
    # Inflammation that is not an infection (gout, trauma, cancer...): raises WBC and CRP just the same.
    sterile = (rng.random(n) < 0.2) * rng.uniform(0.5, 1.5, n)
    dys = np.maximum(s.dysfunction - 0.8, 0.0)
    renal_noise = z()
    values = {
        "wbc": 7.5 * np.exp(0.3 * z()) + 2.5 * s.pneumonia_extent + 1.5 * s.uti + 2.5 * sterile,
        "crp": np.exp(np.log(4.0) + 1.0 * z() + 1.0 * infection + 1.0 * sterile),
        "lactate": 1.1 * np.exp(0.3 * z()) + 1.0 * dys,
        "creatinine": 0.9 * np.exp(0.2 * renal_noise) + 0.08 * a + 0.45 * np.maximum(s.dysfunction - 1.0, 0)
        + 0.2 * s.heart_failure,
        "bnp": np.exp(np.log(60.0) + 0.8 * z() + 0.5 * a + 2.2 * s.heart_failure * (0.5 + s.hf_severity)
                      + 0.2 * s.afib),
        "troponin": np.exp(np.log(8.0) + 0.7 * z() + 0.5 * s.heart_failure + 0.3 * np.minimum(dys, 2.0)),
        "sodium": 139.0 + 2.5 * z() - 4.0 * s.heart_failure * s.hf_severity - 1.0 * np.minimum(dys, 2.0),
        "potassium": 4.2 + 0.3 * z() + 0.25 * renal_noise + 0.3 * np.maximum(s.dysfunction - 1.0, 0),
        "hemoglobin": np.where(s.female, 13.2, 14.8) + 1.3 * z(),
        "platelets": 250.0 * np.exp(0.25 * z()) - 40.0 * np.minimum(dys, 2.0),
        "glucose": 100.0 * np.exp(0.18 * z()) + 10.0 * np.minimum(dys, 2.0),
        "temperature": 36.9 + 0.35 * z() + np.where(s.fever, rng.uniform(0.5, 2.2, n), 0.0) + 0.4 * sterile,
        "heart_rate": s.heart_rate + 3.0 * z(),
        "respiratory_rate": 16.0 + 2.5 * z() + 4.0 * s.pneumonia_extent + 2.0 * np.minimum(dys, 2.0)
        + 2.0 * s.heart_failure,
        "systolic_bp": 128.0 + 15.0 * z() + 4.0 * a - 12.0 * np.minimum(dys, 2.0),
        "spo2": 97.0 + 1.3 * z() - 4.0 * s.pneumonia_extent - 2.5 * s.heart_failure * s.hf_severity
        - 1.0 * s.effusion_size,
    }
    out = np.empty((n, len(FEATURES)), np.float32)
    for j, f in enumerate(FEATURES):
        col = np.clip(values[f.name], f.low, f.high)
        col = np.where(rng.random(n) < f.missing_rate * missing_scale, np.nan, col)
        out[:, j] = col
    return out
