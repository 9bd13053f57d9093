"""VQA-RAD -> mmjax manifest: radiology image + closed question -> answer.

VQA-RAD (Lau, Gayen, Ben Abacha, Demner-Fushman: "A dataset of clinically generated visual
questions and answers about radiology images", Scientific Data 5, 180251, 2018; CC0-1.0): 315
radiology images (head CT/MRI, chest X-ray, abdominal CT) with clinician-written question/answer
pairs, here in the MEVF layout: `trainset.json`, `testset.json` (fields qid, image_name,
image_organ, question, answer, answer_type, question_type) and `images/`.

The manifest keeps the CLOSED questions only (answer_type 'CLOSED'; two train entries spelled
'CLOSED ' with a trailing space are kept too), which makes the task a classification: one row per
question, id `train-<qid>` / `test-<qid>` after the official file. Train and test share images,
so the id is the question, not the image. Split: the official test file is `test`; 10% of the
train file's images (chosen by a hash of the image name) with all their questions are
`validation`, so no validation image appears in `train`; the rest is `train`.

Modalities: `image` (the JPG, RGB, resized to 224) and `question` (text). Task `answer`:
multiclass over the normalized answer (lowercase, stripped, trailing '.' removed); the classes
are the answers seen at least twice among the train file's closed questions, sorted, plus
'other', to which every rarer answer (train or test) maps, so that every test question counts in
the accuracy. Extra columns `organ` and `question_type` allow per-group results.

On the copy in ../shared/data: train 1,623, validation 200 (29 of the 294 train images), test
272 rows. Classes, rows in train / validation / test: no 769/115/133, yes 757/72/118, other
22/4/15, and 29 more answers seen 2 to 6 times in the train file (75/9/6 rows together: flair,
heterogeneous, white matter, left, ...). The 15 test 'other' rows have answers seen at most once
in the train file (mri, abnormal, female, ...).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

from mmjax.data.public import block_list, csv_text, flow, relpath, require, write_outputs

VALIDATION_FRACTION = 0.1
OTHER = "other"


def normalize(answer) -> str:
    """Lowercase, stripped, trailing '.' removed (some answers are numbers in the JSON)."""
    return str(answer).strip().lower().rstrip(".").strip()


def _closed(path: str) -> list[dict]:
    with open(path) as f:
        return [q for q in json.load(f) if q["answer_type"].strip() == "CLOSED"]


def validation_images(images) -> set[str]:
    """A deterministic 10% of the images: the first by SHA-256 of the name."""
    ranked = sorted(set(images), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    return set(ranked[: round(VALIDATION_FRACTION * len(ranked))])


def write_manifest(source_dir: str, out_dir: str) -> tuple[str, str]:
    require(source_dir, "trainset.json", "testset.json", "images")
    files = {"train": _closed(os.path.join(source_dir, "trainset.json")),
             "test": _closed(os.path.join(source_dir, "testset.json"))}
    require(source_dir, *sorted({f"images/{q['image_name']}" for qs in files.values() for q in qs}))

    counts = collections.Counter(normalize(q["answer"]) for q in files["train"])
    classes = sorted(a for a, n in counts.items() if n >= 2 and a != OTHER) + [OTHER]
    known = set(classes)
    held_out = validation_images(q["image_name"] for q in files["train"])

    rows = []
    for source, questions in files.items():
        for q in questions:
            split = "validation" if source == "train" and q["image_name"] in held_out else source
            answer = normalize(q["answer"])
            rows.append([f"{source}-{q['qid']}", split,
                         relpath(os.path.join(source_dir, "images", q["image_name"]), out_dir),
                         q["question"].strip(), answer if answer in known else OTHER,
                         q["image_organ"].strip(), q["question_type"].strip()])
    manifest = csv_text(["id", "split", "image", "question", "answer", "organ", "question_type"], rows)

    schema = f"""\
# VQA-RAD (Lau et al., Sci. Data 2018; CC0-1.0), CLOSED questions only; written by mmjax.data.public.vqa_rad.
id: id           # the question (train-<qid> / test-<qid>): train and test share images
split: split     # official train/test; validation = 10% of the train images with all their questions
modalities:
  image: {flow(dict(kind="image", column="image", size=224, channels=3))}
  question: {flow(dict(kind="text", column="question"))}
tasks:
  # normalized answer (lowercase, stripped, trailing '.' removed). Classes: the answers seen at least
  # twice among the train file's closed questions, plus 'other' for every rarer answer (train or
  # test), kept so every test question counts in the accuracy.
  answer:
    kind: multiclass
    column: answer
    classes:
{block_list(classes, 6, [f"{counts[c]} train-file questions" for c in classes[:-1]] + ["all rarer answers"])}
"""
    return write_outputs(out_dir, manifest, schema)
