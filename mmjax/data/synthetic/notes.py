"""Free-text admission notes generated from the latent state.

Each symptom is reported with a probability that depends on the patient's conditions (and at a
small false-positive rate without them), phrased with one of several synonyms. An absent
symptom is sometimes stated as a negation ("denies fever"), so words alone mislead a
bag-of-words model. Irrelevant social and history sentences, shuffled order and occasional
typos make the note noisy.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.synthetic.latent import PatientState

# symptom -> (positive phrasings, negated phrasings)
_PHRASES = {
    "cough": (["productive cough", "a cough for several days", "persistent coughing", "wet cough"],
              ["denies cough", "no cough"]),
    "sputum": (["green sputum", "yellow sputum production", "coughing up phlegm"],
               ["no sputum production"]),
    "fever": (["fever", "fevers and chills", "feeling feverish", "high temperatures at home"],
              ["denies fever", "no fevers or chills", "afebrile at home"]),
    "dyspnea": (["shortness of breath", "dyspnea", "breathlessness on exertion", "difficulty breathing"],
                ["denies shortness of breath", "no dyspnea"]),
    "orthopnea": (["orthopnea", "needs three pillows to sleep", "cannot lie flat"],
                  ["no orthopnea", "sleeps flat without difficulty"]),
    "edema": (["bilateral leg swelling", "ankle edema", "swollen legs", "pitting edema to the knees"],
              ["no leg swelling", "denies ankle swelling"]),
    "pleuritic": (["pleuritic chest pain", "sharp chest pain on deep inspiration", "pain when breathing in"],
                  ["denies chest pain", "no chest pain"]),
    "palpitations": (["palpitations", "a racing irregular heartbeat", "fluttering in the chest"],
                     ["denies palpitations", "no palpitations"]),
    "af_history": (["history of paroxysmal atrial fibrillation", "known paroxysmal AF",
                    "previous episodes of atrial fibrillation"], ["no known arrhythmia"]),
    "urinary": (["dysuria", "burning on urination", "urinary frequency and urgency", "foul smelling urine"],
                ["denies dysuria", "no urinary symptoms"]),
    "confusion": (["new confusion", "altered mental status", "is disoriented", "family reports drowsiness"],
                  ["alert and oriented", "no confusion"]),
    "rigors": (["rigors", "shaking chills"], ["no rigors"]),
}

_IRRELEVANT = [
    "Lives with her daughter.", "Lives alone in an apartment.", "Retired teacher.",
    "Allergic to penicillin.", "No known drug allergies.", "Ex-smoker, quit ten years ago.",
    "Drinks alcohol socially.", "Enjoys gardening.", "Had a knee replacement last year.",
    "Takes vitamin D supplements.", "Vaccinations are up to date.", "Recently returned from a trip.",
    "History of hypertension on amlodipine.", "Type 2 diabetes on metformin.",
    "Appendectomy as a child.", "Wears glasses.", "Independent with daily activities.",
]

_OPENERS = ["presents with", "presenting with", "comes in with", "reports", "complains of"]


def _report_probabilities(s: PatientState) -> dict[str, np.ndarray]:
    """Per symptom, the probability [N] that the note mentions it as present."""
    p = lambda cond, yes, no: np.where(cond, yes, no)
    return {
        "cough": p(s.pneumonia, 0.55, 0.15),
        "sputum": p(s.pneumonia, 0.35, 0.06),
        "fever": p(s.fever, 0.65, 0.05),
        "dyspnea": np.clip(0.08 + 0.35 * s.pneumonia + 0.6 * s.heart_failure + 0.3 * s.effusion, 0, 0.9),
        "orthopnea": p(s.heart_failure, 0.15 + 0.35 * s.hf_severity, 0.03),
        "edema": p(s.heart_failure, 0.2 + 0.3 * s.hf_severity, 0.06),
        "pleuritic": np.clip(0.05 + 0.25 * s.effusion + 0.15 * s.pneumonia, 0, 0.9),
        "palpitations": p(s.afib, np.where(s.af_during_ecg, 0.25, 0.4), 0.06),
        "af_history": p(s.afib, np.where(s.af_during_ecg, 0.15, 0.3), 0.01),
        "urinary": p(s.uti, 0.7, 0.04),
        "confusion": p(s.sepsis, 0.4, 0.05 + 0.04 * (s.age > 80)),
        "rigors": p(s.sepsis, 0.3, 0.03),
    }


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = rng.integers(0, 3)
    if kind == 0:  # swap two letters
        return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def write_notes(s: PatientState, rng: np.random.Generator, typo_rate: float = 0.02):
    """One note per patient, and {symptom: bool[N]}: which symptoms each note reports as present."""
    probs = _report_probabilities(s)
    n = len(s.age)
    mentioned = {k: rng.random(n) < v for k, v in probs.items()}
    negated = {k: ~mentioned[k] & (rng.random(n) < 0.25) for k in probs}
    notes = []
    for i in range(n):
        sex = ["woman", "female", "F"][rng.integers(3)] if s.female[i] else ["man", "male", "M"][rng.integers(3)]
        positives = [k for k in _PHRASES if mentioned[k][i]]
        negatives = [k for k in _PHRASES if negated[k][i]]
        rng.shuffle(positives)
        rng.shuffle(negatives)
        pick = lambda options: options[rng.integers(len(options))]
        sentences = []
        age = int(s.age[i])
        if positives:
            first = ", ".join(pick(_PHRASES[k][0]) for k in positives[:2])
            sentences.append(f"{age} year old {sex} {pick(_OPENERS)} {first}.")
            sentences += [f"Also reports {pick(_PHRASES[k][0])}." for k in positives[2:]]
        else:
            sentences.append(f"{age} year old {sex} {pick(_OPENERS)} general malaise.")
        sentences += [f"{pick(_PHRASES[k][1]).capitalize()}." for k in negatives]
        sentences += list(rng.choice(_IRRELEVANT, size=rng.integers(1, 4), replace=False))
        order = [sentences[0]] + [sentences[j] for j in rng.permutation(len(sentences) - 1) + 1]
        words = " ".join(order).split(" ")
        typo = rng.random(len(words)) < typo_rate
        notes.append(" ".join(_typo(w, rng) if t else w for w, t in zip(words, typo)))
    return notes, mentioned
