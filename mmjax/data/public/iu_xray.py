"""Indiana University chest X-ray reports (Open-i) -> mmjax manifest: report text -> Problems.

The Indiana University chest X-ray collection (Demner-Fushman et al.: "Preparing a collection of
radiology examinations for distribution and retrieval", JAMIA 23(2):304-310, 2016), distributed
by Open-i / NLM under CC BY-NC-ND 4.0 (research use only). This copy has the reports only:
`indiana_reports.csv` (uid, MeSH, Problems, image, indication, comparison, findings, impression);
no images.

One row per report, id = uid. Two text modalities: `indication` (why the study was ordered) and
`findings` (what the radiologist saw). An empty cell, or one that says nothing ('None.', 'N/A',
'.', or the spreadsheet error '#NAME?' that replaced 3 indications), stays empty, so that
modality is absent for the row; the XXXX anonymization tokens are kept as they are. The
impression is not used: it states the answer.

Task `problems`: multilabel over the Problems column (';'-separated MeSH-like terms, stripped and
de-duplicated within a report). The classes are the 10 labels found in the most reports (ties
alphabetical), written into the schema. 'No Indexing' (92 reports that were never coded) leaves
the label unknown rather than all-negative. No split column: mmjax splits by hashing the id.

On the copy in ../shared/data: 3,851 rows; indication present in 3,762, findings in 3,337;
problems known for 3,759. Reports with each class: normal 1379, Lung 539, Opacity 432,
Cardiomegaly 345, Pulmonary Atelectasis 315, Calcinosis 292, Calcified Granuloma 266, Thoracic
Vertebrae 256, Cicatrix 184, Spine 174.
"""

from __future__ import annotations

import collections
import csv
import os
import re

from mmjax.data.public import block_list, csv_text, flow, require, write_outputs

N_CLASSES = 10
NOT_INDEXED = "No Indexing"
_SAYS_NOTHING = re.compile(r"\s*(none|n/?a|#name\?)?\s*\.?\s*", re.IGNORECASE)


def text_or_none(cell: str) -> str | None:
    """The cell's text, or None when it is empty or says nothing ('None.', 'N/A', '#NAME?')."""
    return None if _SAYS_NOTHING.fullmatch(cell) else cell.strip()


def problems(cell: str) -> list[str]:
    """The report's labels, stripped and de-duplicated in order; [] (unknown) for 'No Indexing'."""
    labels = list(dict.fromkeys(p.strip() for p in cell.split(";") if p.strip()))
    return [] if labels == [NOT_INDEXED] else labels


def write_manifest(source_dir: str, out_dir: str) -> tuple[str, str]:
    require(source_dir, "indiana_reports.csv")
    with open(os.path.join(source_dir, "indiana_reports.csv"), newline="", encoding="utf-8") as f:
        reports = list(csv.DictReader(f))

    labels = [problems(r["Problems"]) for r in reports]
    counts = collections.Counter(p for ps in labels for p in ps)
    classes = sorted(counts, key=lambda p: (-counts[p], p))[:N_CLASSES]
    rows = [[r["uid"].strip(), text_or_none(r["indication"]), text_or_none(r["findings"]), ";".join(ps) or None]
            for r, ps in zip(reports, labels)]
    manifest = csv_text(["id", "indication", "findings", "problems"], rows)

    schema = f"""\
# Indiana University chest X-ray reports (Open-i; CC BY-NC-ND 4.0, research use only); written by
# mmjax.data.public.iu_xray. Reports only, no images; the impression is left out (it states the answer).
id: id         # the report's uid; no split column: mmjax splits by hashing the id
modalities:
  indication: {flow(dict(kind="text", column="indication"))}   # empty or 'None.' -> absent
  findings: {flow(dict(kind="text", column="findings"))}
tasks:
  # Problems labels, stripped and de-duplicated; the {N_CLASSES} found in the most reports (ties alphabetical).
  # Labels outside this list are not predicted; 'No Indexing' (never coded) leaves the row's label unknown.
  problems:
    kind: multilabel
    column: problems
    separator: ';'
    other_labels: ignore        # labels outside the list are not predicted
    classes:
{block_list(classes, 6, [f"{counts[c]} reports" for c in classes])}
"""
    return write_outputs(out_dir, manifest, schema)
