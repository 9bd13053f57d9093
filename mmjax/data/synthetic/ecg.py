"""Single-lead ECG-like signals with real rhythm structure, generated from the latent state.

Sinus rhythm: P-QRS-T complexes at regular RR intervals (rate from the latent heart rate, with
mild respiratory variability). Atrial fibrillation: irregularly irregular RR intervals, no P
waves, fibrillatory baseline waves at 4-8 Hz. Premature beats in some sinus patients give an
irregularity that is not AF. Every recording has baseline wander, white noise and, sometimes,
a burst of muscle artefact. Amplitudes are in millivolts.

`twelve_leads` turns lead II recordings into 12 leads for the size of a real 12-lead ECG (the
`large` variant): each lead is the recording projected on the lead's axis (frontal-plane angles of
the limb leads, horizontal-plane ones of V1-V6) against a per-patient electrical axis, plus the
lead's own noise. A stand-in with a 12-lead ECG's shape and inter-lead correlation, not a
simulation of the heart's vector.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.synthetic.latent import PatientState

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Each lead's angle in degrees: limb leads in the frontal plane (hexaxial system), chest leads in the
# horizontal plane.
_LIMB_ANGLES = {"I": 0, "II": 60, "III": 120, "aVR": -150, "aVL": -30, "aVF": 90}
_CHEST_ANGLES = {"V1": 115, "V2": 94, "V3": 75, "V4": 60, "V5": 30, "V6": 0}

# (offset from R peak in s, width in s, amplitude in mV) of each wave of a sinus beat
_WAVES = {"P": (-0.16, 0.025, 0.15), "Q": (-0.025, 0.01, -0.12), "R": (0.0, 0.012, 1.1),
          "S": (0.03, 0.012, -0.25), "T": (0.28, 0.05, 0.3)}


def _beat_times(rng, rate_bpm, irregular, ectopy, duration):
    mean_rr = 60.0 / rate_bpm
    n_beats = int(duration / mean_rr * 1.6) + 4
    if irregular:
        rr = mean_rr * np.exp(0.2 * rng.standard_normal(n_beats))
    else:
        phase = rng.uniform(0, 2 * np.pi)
        rr = mean_rr * (1 + 0.03 * np.sin(2 * np.pi * 0.25 * np.arange(n_beats) * mean_rr + phase)
                        + 0.01 * rng.standard_normal(n_beats))
        if ectopy:  # one or two premature beats followed by a compensatory pause
            for k in rng.choice(np.arange(1, n_beats - 1), size=rng.integers(1, 3), replace=False):
                rr[k] *= 0.6
                rr[k + 1] *= 1.4
    return np.cumsum(rr) - rng.uniform(0, mean_rr)


def record_ecgs(s: PatientState, rng: np.random.Generator, hz: int, seconds: float = 10.0):
    """Returns f32[N, hz * seconds] single-lead recordings."""
    n = len(s.age)
    length = int(round(hz * seconds))
    t = np.arange(length, dtype=np.float32) / hz
    out = np.empty((n, length), np.float32)
    for i in range(n):
        af = bool(s.af_during_ecg[i])
        beats = _beat_times(rng, float(s.heart_rate[i]), af, bool(s.ectopy[i]), seconds)
        beats = beats[(beats > -0.5) & (beats < seconds + 0.5)][:, None]
        gain = rng.uniform(0.7, 1.3) * (1.0 - 0.25 * s.hf_severity[i])  # low voltage in heart failure
        qrs_width = 1.0 + 0.6 * (s.heart_failure[i] and rng.random() < 0.3)  # bundle branch block
        x = np.zeros(length, np.float32)
        for name, (offset, width, amp) in _WAVES.items():
            if name == "P" and af:
                continue
            w = width * (qrs_width if name in "QRS" else 1.0)
            x += amp * np.exp(-0.5 * ((t[None, :] - beats - offset) / w) ** 2).sum(0)
        x *= gain
        if af:  # fibrillatory waves
            f = rng.uniform(4.0, 8.0)
            x += rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) * (
                1 + 0.3 * np.sin(2 * np.pi * 0.5 * t))
        wander = rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 6.3))
        x += wander + rng.uniform(0.01, 0.05) * rng.standard_normal(length)
        if rng.random() < 0.15:  # muscle artefact burst
            start = rng.integers(0, length - hz)
            x[start:start + hz] += 0.15 * rng.standard_normal(hz)
        out[i] = x
    return out


def twelve_leads(lead_ii: np.ndarray, s: PatientState, rng: np.random.Generator) -> np.ndarray:
    """f32[N, T] lead II recordings -> f32[N, T, 12] in the order of `LEADS` (see the module docstring).
    The frontal axis is about +60 degrees, shifted left in heart failure (left axis deviation)."""
    n, length = lead_ii.shape
    frontal = np.deg2rad(60.0 - 45.0 * s.hf_severity + rng.normal(0.0, 15.0, n))  # [N]
    horizontal = np.deg2rad(rng.normal(60.0, 15.0, n))
    out = np.empty((n, length, len(LEADS)), np.float32)
    for k, lead in enumerate(LEADS):
        if lead in _LIMB_ANGLES:
            angle, axis = np.deg2rad(_LIMB_ANGLES[lead]), frontal
        else:
            angle, axis = np.deg2rad(_CHEST_ANGLES[lead]), horizontal
        # lead II as recorded is the reference: its projection on the patient's own axis
        gain = np.cos(angle - axis) / np.maximum(np.cos(np.deg2rad(60.0) - frontal), 0.3)
        out[:, :, k] = gain[:, None] * lead_ii + rng.uniform(0.01, 0.04, (n, 1)) * rng.standard_normal((n, length))
    out[:, :, LEADS.index("II")] = lead_ii  # lead II itself as simulated
    return out
