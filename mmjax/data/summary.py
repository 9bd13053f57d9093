"""A prepared dataset's summary: split sizes, label prevalence, modality presence, missing values.

    python -m mmjax.data.summary [--dataset=synthetic_patients/default] [--data_dir=D] [--json=out.json]
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from mmjax.batch import MODALITIES
from mmjax.data import pipeline


def summarize(builder, splits=None) -> dict:
    """Statistics of each split, read through the TFDS data source (one pass)."""
    spec = pipeline.DatasetSpec.from_builder(builder)
    out = {"dataset": f"{builder.name}/{builder.builder_config.name}", "version": str(builder.version),
           "data_dir": builder.data_dir, "tasks": [t.to_dict() for t in spec.tasks], "splits": {}}
    for split in splits or spec.split_sizes:
        src = builder.as_data_source(split)
        n = len(src)
        present = np.zeros((n, len(MODALITIES)), bool)
        labs = np.zeros((n, len(spec.tabular_names)), np.float32)
        diagnosis, severity, mortality, known, tokens = [], [], [], [], []
        for i in range(n):
            ex = src[i]
            present[i] = [ex["present"][m] for m in MODALITIES]
            labs[i] = ex["labs"]
            diagnosis.append(ex["labels"]["diagnosis"])
            severity.append(ex["labels"]["severity"])
            mortality.append(ex["labels"]["mortality"])
            known.append(ex["label_known"]["mortality"])
            if ex["present"]["text"]:
                tokens.append(len(spec.tokenizer.tokenize(ex["note"].decode("utf-8"))))
        diagnosis, severity, known = np.array(diagnosis), np.array(severity), np.array(known)
        tab_present = present[:, MODALITIES.index("tabular")]
        out["splits"][split] = {
            "examples": n,
            "presence_rate": dict(zip(MODALITIES, present.mean(0).round(4).tolist())),
            "prevalence": dict(zip(spec.tasks[0].label_names, diagnosis.mean(0).round(4).tolist())),
            "severity": {"mean": round(float(severity.mean()), 3), "std": round(float(severity.std()), 3),
                         "min": round(float(severity.min()), 3), "max": round(float(severity.max()), 3)},
            "mortality": {"known_rate": round(float(known.mean()), 4),
                          "rate_among_known": round(float(np.array(mortality)[known].mean()), 4)},
            "lab_missing_rate": dict(zip(spec.tabular_names,
                                         np.isnan(labs[tab_present]).mean(0).round(4).tolist())),
            "note_tokens": {"p50": float(np.percentile(tokens, 50)), "p99": float(np.percentile(tokens, 99)),
                            "max": int(max(tokens))} if tokens else {},
        }
    return out


def print_summary(summary: dict) -> None:
    print(f"{summary['dataset']} v{summary['version']} in {summary['data_dir']}")
    for split, s in summary["splits"].items():
        print(f"\n[{split}] {s['examples']} patients")
        print("  present:    " + "  ".join(f"{k} {v:.1%}" for k, v in s["presence_rate"].items()))
        print("  prevalence: " + "  ".join(f"{k} {v:.1%}" for k, v in s["prevalence"].items()))
        sev = s["severity"]
        print(f"  severity:   mean {sev['mean']:.2f} sd {sev['std']:.2f} range [{sev['min']:.2f}, {sev['max']:.2f}]")
        mort = s["mortality"]
        print(f"  mortality:  {mort['rate_among_known']:.1%} of the {mort['known_rate']:.1%} with follow-up")
        worst = sorted(s["lab_missing_rate"].items(), key=lambda kv: -kv[1])[:4]
        print("  labs most often missing: " + ", ".join(f"{k} {v:.0%}" for k, v in worst))
        if s["note_tokens"]:
            t = s["note_tokens"]
            print(f"  note tokens: median {t['p50']:.0f}, p99 {t['p99']:.0f}, max {t['max']}")


_DATASET = flags.DEFINE_string("dataset", "synthetic_patients", "TFDS name, optionally with /config.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $MMJAX_DATA_DIR or ~/tensorflow_datasets).")
_JSON = flags.DEFINE_string("json", None, "Also write the summary to this JSON file.")


def main(argv):
    del argv
    summary = summarize(pipeline.load_builder(_DATASET.value, _DATA_DIR.value))
    print_summary(summary)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)
