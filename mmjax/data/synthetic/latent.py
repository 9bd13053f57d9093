"""The latent patient state from which every modality of `synthetic_patients` is generated.

One patient is a draw of the variables below (all vectorized over patients). Conditions are
correlated through age, sex and each other, and each modality sees only part of the state:

| condition            | image                      | text                        | tabular                 | signal (ECG)        |
|----------------------|----------------------------|-----------------------------|-------------------------|---------------------|
| pneumonia            | lobar opacity (by extent)  | cough, sputum, fever        | WBC, CRP, SpO2, RR, temp| rate (fever)        |
| heart_failure        | cardiothoracic ratio       | orthopnea, oedema, dyspnoea | BNP, sodium             | low voltage, QRS    |
| pleural_effusion     | fluid at a lung base       | pleuritic pain (weak)       | SpO2 (weak)             | -                   |
| atrial_fibrillation  | - (via heart failure)      | palpitations, AF history    | heart rate (weak)       | irregular RR, no P  |
| sepsis               | pneumonia as the source    | urinary sx, confusion, rigors| lactate, BP, platelets | rate (weak)         |

Sepsis is an infection (pneumonia, seen on the image, or a urinary infection, seen only in the
note) *and* organ dysfunction (lactate, blood pressure, platelets, creatinine). Dysfunction has
other causes (heart failure, age) and WBC/CRP also rise with sterile inflammation, so the labs
alone cannot tell sepsis from a sick heart: image or text must be combined with labs. Atrial
fibrillation is paroxysmal: the 10 s ECG catches it in 70% of patients with AF, and the note
mentions palpitations or a history of AF in part of the others, so ECG and text together find
more of it than either alone. `mmjax.evaluation.upper_bound` measures how much each modality
reveals (docs/results.md, "Reference upper bound", has the table).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CONDITIONS = (
    "pneumonia",
    "heart_failure",
    "pleural_effusion",
    "atrial_fibrillation",
    "sepsis",
)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass
class PatientState:
    """Latent variables of N patients; every field is an array with leading dimension N."""

    age: np.ndarray  # years, 18..95
    female: np.ndarray  # bool
    pneumonia: np.ndarray  # bool
    pneumonia_extent: np.ndarray  # 0..1, 0 without pneumonia
    pneumonia_side: np.ndarray  # 0 right lung, 1 left lung (image coordinates: patient's right on the left)
    pneumonia_lower: np.ndarray  # bool: lower zone, else upper/mid zone
    atelectasis: np.ndarray  # bool: a small benign opacity that mimics pneumonia
    uti: np.ndarray  # bool: urinary tract infection (no image sign)
    heart_failure: np.ndarray  # bool
    hf_severity: np.ndarray  # 0..1, 0 without heart failure
    cardiothoracic_ratio: np.ndarray  # ~0.42..0.7
    effusion: np.ndarray  # bool
    effusion_size: np.ndarray  # 0..1
    effusion_side: np.ndarray  # 0 right, 1 left, 2 both
    afib: np.ndarray  # bool: has (paroxysmal) atrial fibrillation
    af_during_ecg: np.ndarray  # bool: in AF during the 10 s recording
    ectopy: np.ndarray  # bool: occasional premature beats (an irregularity that is not AF)
    fever: np.ndarray  # bool
    dysfunction: np.ndarray  # organ-dysfunction score, standard-normal-ish
    sepsis: np.ndarray  # bool
    heart_rate: np.ndarray  # bpm, shared by vitals and ECG
    severity: np.ndarray  # continuous severity score, ~0..10
    mortality: np.ndarray  # bool: died within 30 days
    mortality_known: np.ndarray  # bool: follow-up available (label mask)

    @property
    def diagnosis(self) -> np.ndarray:
        """f32[N, len(CONDITIONS)] multi-label diagnosis targets."""
        cols = [self.pneumonia, self.heart_failure, self.effusion, self.afib, self.sepsis]
        return np.stack(cols, axis=1).astype(np.float32)


def sample_patients(rng: np.random.Generator, n: int) -> PatientState:
    """Draws the latent state of `n` patients."""
    u = lambda: rng.random(n)
    z = lambda: rng.standard_normal(n)
    age = np.clip(63.0 + 16.0 * z(), 18.0, 95.0)
    a = (age - 63.0) / 16.0
    female = u() < 0.5

    pneumonia = u() < _sigmoid(-1.5 + 0.35 * a)
    extent = np.where(pneumonia, rng.uniform(0.05, 1.0, n), 0.0)
    uti = u() < _sigmoid(-2.3 + 0.3 * a + 0.6 * female)
    hf = u() < _sigmoid(-1.7 + 0.9 * a + 0.3 * ~female)
    hf_sev = np.where(hf, rng.uniform(0.0, 1.0, n), 0.0)
    afib = u() < _sigmoid(-2.0 + 0.8 * a + 0.5 * hf)
    effusion = u() < _sigmoid(-3.0 + 2.0 * hf + 1.4 * pneumonia)
    eff_size = np.where(effusion, rng.uniform(0.15, 1.0, n), 0.0)
    # Heart-failure effusions are usually bilateral, parapneumonic ones on the side of the pneumonia.
    side_pn = rng.integers(0, 2, n)
    eff_side = np.where(hf & (u() < 0.6), 2, np.where(pneumonia, side_pn, rng.integers(0, 2, n)))

    infection = pneumonia | uti
    # Organ dysfunction has many causes: infection is one, heart failure and age are others.
    dysfunction = 0.9 * z() + 0.3 * a + 0.6 * infection + 0.4 * extent + 1.0 * hf * hf_sev
    sepsis = infection & (dysfunction > 1.0)
    fever = (infection & (u() < 0.75)) | (u() < 0.04)
    af_now = afib & (u() < 0.7)
    ctr = 0.45 + 0.04 * z() + 0.012 * a + hf * (0.03 + 0.07 * hf_sev)
    hr = 76 + 10 * z() + 8 * fever + 5 * sepsis + 12 * af_now + 4 * hf
    severity = (
        2.2 * extent + 1.8 * hf_sev * hf + 3.0 * sepsis + 0.7 * np.maximum(dysfunction - 1.0, 0)
        + 0.8 * eff_size + 0.5 * af_now + 0.25 * a + 0.3 * z() + 1.0
    )
    severity = np.clip(severity, 0.0, None)
    mortality = u() < _sigmoid(-4.2 + 0.75 * severity)
    return PatientState(
        age=age, female=female, pneumonia=pneumonia, pneumonia_extent=extent,
        pneumonia_side=side_pn, pneumonia_lower=u() < 0.65, atelectasis=~pneumonia & (u() < 0.15),
        uti=uti, heart_failure=hf, hf_severity=hf_sev, cardiothoracic_ratio=ctr,
        effusion=effusion, effusion_size=eff_size, effusion_side=eff_side, afib=afib,
        af_during_ecg=af_now, ectopy=~af_now & (u() < 0.1), fever=fever, dysfunction=dysfunction,
        sepsis=sepsis, heart_rate=np.clip(hr, 38, 185), severity=severity.astype(np.float32),
        mortality=mortality, mortality_known=u() < 0.9,
    )
