"""PhysioNet/CinC Challenge 2021 sample -> mmjax manifest: 12-lead ECG + age/sex -> SNOMED-CT codes.

The PhysioNet/Computing in Cardiology Challenge 2021 (Reyna, Sadr, Perez Alday et al.: "Will Two
Do? Varying Dimensions in Electrocardiography: The PhysioNet/Computing in Cardiology Challenge
2021", CinC 2021; PTB-XL: Wagner et al., Scientific Data 2020), CC BY 4.0 as published on
PhysioNet. This is the 50-record sample shipped with torch_ecg: `index.csv` (record, source
database, ...) and `records/<id>.hea` + `<id>.mat` (WFDB: 12 leads, 10 s at 500 Hz).

One row per record, id = record name. Modality `ecg`: the path to the WFDB header (mmjax reads
the signal and resamples it to 100 Hz). Modality `demographics` (tabular): age and sex, parsed
from the header's comment lines (`# Age: 78`, `# Sex: Male`) with wfdb.rdheader; 'Unknown' or
NaN leaves the cell empty. Task `dx`: multilabel over the header's `# Dx:` SNOMED-CT codes (all
codes are written, ';'-separated); the classes are the 5 most frequent codes in the sample (ties
alphabetical). Column `database` (from index.csv) names the source database. No split column:
mmjax splits by hashing the id. Too small to train on: for loader and smoke tests.

On the copy in ../shared/data: 50 rows (20 G12EC, 20 Chapman-Shaoxing/Ningbo, 10 PTB-XL), sex
27 Female / 23 Male, age 5 to 89, every record with 12 leads and a Dx. Classes (records):
427084000 sinus tachycardia 23, 284470004 premature atrial contraction 20, 426783006 sinus
rhythm 15, 164934002 T-wave abnormality 10, 698252002 nonspecific intraventricular conduction
disorder 9. One record (HR06003, PTB-XL) carries both sinus rhythm and sinus tachycardia.
"""

from __future__ import annotations

import collections
import csv
import math
import os

import wfdb

from mmjax.data.public import block_list, csv_text, flow, relpath, require, write_outputs

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
N_CLASSES = 5
# Condition names as given in ../shared/data/cinc2021_sample/SOURCE.md.
SNOMED_NAMES = {
    "427084000": "sinus tachycardia",
    "284470004": "premature atrial contraction",
    "426783006": "sinus rhythm",
    "164934002": "T-wave abnormality",
    "698252002": "nonspecific intraventricular conduction disorder",
}


def header_fields(record_path: str) -> dict[str, str]:
    """The `# Key: value` comment lines of a WFDB header (path without extension), e.g. {'Age': '78'}."""
    fields = {}
    for line in wfdb.rdheader(record_path).comments:
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def known(value: str | None) -> str | None:
    return None if not value or value.lower() in ("unknown", "nan") else value


def age(value: str | None) -> str | None:
    value = known(value)
    if value is None:
        return None
    years = float(value)
    return None if math.isnan(years) else f"{years:g}"


def write_manifest(source_dir: str, out_dir: str) -> tuple[str, str]:
    require(source_dir, "index.csv", "records")
    with open(os.path.join(source_dir, "index.csv"), newline="") as f:
        index = list(csv.DictReader(f))
    require(source_dir, *(f"records/{r['record']}{ext}" for r in index for ext in (".hea", ".mat")))

    rows, counts = [], collections.Counter()
    for r in index:
        path = os.path.join(source_dir, "records", r["record"])
        fields = header_fields(path)
        codes = list(dict.fromkeys(c.strip() for c in fields.get("Dx", "").split(",") if c.strip()))
        counts.update(codes)
        rows.append([r["record"], relpath(path + ".hea", out_dir), age(fields.get("Age")),
                     known(fields.get("Sex")), ";".join(codes) or None, r.get("source")])
    manifest = csv_text(["id", "ecg", "age", "sex", "dx", "database"], rows)

    classes = sorted(counts, key=lambda c: (-counts[c], c))[:N_CLASSES]
    notes = [f"{SNOMED_NAMES.get(c, 'SNOMED-CT ' + c)} ({counts[c]} records)" for c in classes]
    schema = f"""\
# PhysioNet/CinC Challenge 2021, a 50-record sample (Reyna et al., CinC 2021; CC BY 4.0); written by
# mmjax.data.public.cinc2021. For loader and smoke tests: too small to train on.
id: id     # the record name; no split column: mmjax splits by hashing the id
modalities:
  # WFDB header (records/<id>.hea next to its .mat): 12 leads, 10 s at 500 Hz, resampled to 100 Hz
  ecg: {flow(dict(kind="signal", column="ecg", rate=100, seconds=10, channels=LEADS))}
  # from the header's '# Age:' and '# Sex:' lines; empty when Unknown
  demographics: {flow(dict(kind="tabular", numeric=["age"], categorical=["sex"]))}
tasks:
  # the header's '# Dx:' SNOMED-CT codes (all of them in the column); classes: the {N_CLASSES} most frequent
  dx:
    kind: multilabel
    column: dx
    separator: ';'
    other_labels: ignore        # the rarer codes are not predicted
    classes:
{block_list(classes, 6, notes)}
"""
    return write_outputs(out_dir, manifest, schema)
