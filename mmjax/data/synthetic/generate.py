"""Generates one split of `synthetic_patients` as arrays, deterministically for a seed."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from mmjax.data.synthetic.ecg import record_ecgs, twelve_leads
from mmjax.data.synthetic.image import render_images
from mmjax.data.synthetic.labs import measure_labs
from mmjax.data.synthetic.latent import PatientState, sample_patients
from mmjax.data.synthetic.notes import write_notes

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
MODALITIES = ("image", "text", "tabular", "signal")  # this dataset's modality names (each of its own kind)
DEFAULT_MISSING_RATES = {"image": 0.15, "text": 0.1, "tabular": 0.1, "signal": 0.2}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    image_size: int = 64
    ecg_hz: int = 100
    ecg_seconds: float = 10.0
    missing_rates: tuple[tuple[str, float], ...] = tuple(DEFAULT_MISSING_RATES.items())
    lab_missing_scale: float = 1.0
    typo_rate: float = 0.02
    seed: int = 0
    ecg_leads: int = 1  # 1 (lead II) or 12 (`ecg.twelve_leads`)
    note_visits: int = 1  # notes per patient, joined: more than one gives long notes (the `large` variant)

    def __post_init__(self):
        if not 16 <= self.image_size <= 224:
            raise ValueError(f"image_size={self.image_size}: must be within 16..224")
        if not 50 <= self.ecg_hz <= 500:
            raise ValueError(f"ecg_hz={self.ecg_hz}: must be within 50..500")
        unknown = set(dict(self.missing_rates)) - set(MODALITIES)
        if unknown:
            raise ValueError(f"missing_rates: unknown modalities {sorted(unknown)}; use {MODALITIES}")
        for m, r in self.missing_rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"missing_rates[{m!r}]={r}: must be in [0, 1)")
        if self.ecg_leads not in (1, 12):
            raise ValueError(f"ecg_leads={self.ecg_leads}: must be 1 or 12")
        if not 1 <= self.note_visits <= 64:
            raise ValueError(f"note_visits={self.note_visits}: must be within 1..64")


def generate_split(settings: GenerationSettings, split: str, n: int, with_evidence: bool = False):
    """Returns (columns, state): a dict of per-patient arrays and the latent PatientState.

    With `with_evidence`, returns (columns, state, evidence): what each modality was generated
    from before rendering noise and missingness (see `mmjax.evaluation.upper_bound`).

    Each split draws from its own stream `(seed, split)`, so splits are independent and the
    same settings always give the same content.
    """
    rng = np.random.default_rng([settings.seed, SPLIT_IDS[split]])
    state = sample_patients(rng, n)
    # Each generator gets its own child stream: changing one modality does not shift the others.
    streams = rng.spawn(5)
    images = render_images(state, streams[0], settings.image_size)
    notes, mentions = write_notes(state, streams[1], settings.typo_rate)
    complete_labs = measure_labs(state, copy.deepcopy(streams[2]), missing_scale=0.0) if with_evidence else None
    labs = measure_labs(state, streams[2], settings.lab_missing_scale)
    ecgs = record_ecgs(state, streams[3], settings.ecg_hz, settings.ecg_seconds)
    # The large variant's extras draw from streams of their own: the default's content stays as it was.
    extra = np.random.default_rng([settings.seed, SPLIT_IDS[split], 1])
    if settings.ecg_leads == 12:
        ecgs = twelve_leads(ecgs, state, extra)
    for visit in range(1, settings.note_visits):  # follow-up notes of the same patients
        more, _ = write_notes(state, extra, settings.typo_rate)
        notes = [f"{a} Follow-up visit {visit}: {b}" for a, b in zip(notes, more)]

    rates = dict(settings.missing_rates)
    present = {m: streams[4].random(n) >= rates.get(m, 0.0) for m in MODALITIES}
    nothing = ~np.any(np.stack(list(present.values())), axis=0)
    # Every patient has at least one modality: give the ones that drew none a random one back.
    revived = streams[4].integers(0, len(MODALITIES), n)
    for k, m in enumerate(MODALITIES):
        present[m] |= nothing & (revived == k)

    images[~present["image"]] = 0
    ecgs[~present["signal"]] = 0.0
    labs[~present["tabular"]] = np.nan
    notes = [t if p else "" for t, p in zip(notes, present["text"])]
    offset = SPLIT_IDS[split] * 10_000_000
    columns = {
        "patient_id": offset + np.arange(n, dtype=np.int64),
        "age": state.age.astype(np.float32),
        "female": state.female,
        "image": images,
        "note": notes,
        "labs": labs,
        "ecg": ecgs,
        "present": present,
        "diagnosis": state.diagnosis,
        "severity": state.severity,
        "mortality": state.mortality.astype(np.float32),
        "mortality_known": state.mortality_known,
    }
    if not with_evidence:
        return columns, state
    evidence = {
        "image": np.stack([state.pneumonia_extent + 0.25 * state.atelectasis, state.cardiothoracic_ratio,
                           state.effusion_size], axis=1),
        "text": np.stack([mentions[k] for k in sorted(mentions)], axis=1).astype(np.float64),
        "tabular": complete_labs.astype(np.float64),
        "signal": np.stack([state.af_during_ecg, state.ectopy, state.heart_rate], axis=1).astype(np.float64),
    }
    return columns, state, evidence


def example_at(columns: dict, i: int) -> dict:
    """The i-th patient of `columns` as a TFDS example dict."""
    return {
        "patient_id": columns["patient_id"][i],
        "age": columns["age"][i],
        "female": columns["female"][i],
        "image": columns["image"][i],
        "note": columns["note"][i],
        "labs": columns["labs"][i],
        "ecg": columns["ecg"][i],
        "present": {m: columns["present"][m][i] for m in MODALITIES},
        "labels": {
            "diagnosis": columns["diagnosis"][i],
            "severity": columns["severity"][i],
            "mortality": columns["mortality"][i],
        },
        "label_known": {"mortality": columns["mortality_known"][i]},
    }


__all__ = ["GenerationSettings", "PatientState", "generate_split", "example_at", "SPLIT_IDS"]
