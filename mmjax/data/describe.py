"""A prepared dataset's summary, read through its TFDS data source (one pass per split): split sizes,
presence per modality, label distribution, missing numeric values, text lengths.

    python -m mmjax.data.describe [--dataset=synthetic_patients/default] [--data_dir=D] [--json=out.json]

Driven by the dataset's `DatasetSpec`, so it works for any registered dataset (a manifest dataset
prints its own summary: `python -m mmjax.data.manifest`).
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from mmjax.console import run
from mmjax.data import pipeline, sources
from mmjax.data.tokenizer import WordPieceTokenizer
from mmjax.data.transforms import get_field, tabular_parts

FLAGS = flags.FLAGS


def summarize(builder, splits=None) -> dict:
    spec = pipeline.DatasetSpec.from_builder(builder)
    out = {"dataset": f"{builder.name}/{builder.builder_config.name}", "version": str(builder.version),
           "data_dir": builder.data_dir, "tasks": [t.to_dict() for t in spec.tasks], "splits": {}}
    tokenizers = {m.name: WordPieceTokenizer(m.vocab) for m in spec.modalities if m.kind == "text"}
    for split in splits or spec.split_sizes:
        src = builder.as_data_source(split)
        n = len(src)
        present = {m.name: np.zeros(n, bool) for m in spec.modalities}
        numeric = {m.name: np.full((n, len(m.numeric)), np.nan) for m in spec.modalities if m.kind == "tabular"}
        labels = {t.name: [] for t in spec.tasks}
        known = {t.name: [] for t in spec.tasks}
        tokens = {name: [] for name in tokenizers}
        for i in range(n):
            ex = src[i]
            for m in spec.modalities:
                present[m.name][i] = bool(ex["present"][m.name])
                if m.name in numeric and present[m.name][i]:
                    numeric[m.name][i] = tabular_parts(ex, m)[0]
                if m.name in tokens and present[m.name][i]:
                    text = get_field(ex, m.field)
                    tokens[m.name].append(len(tokenizers[m.name].tokenize(
                        text.decode("utf-8") if isinstance(text, bytes) else str(text))))
            for t in spec.tasks:
                y = np.asarray(ex["labels"][t.name], np.float64)
                labels[t.name].append(y)
                known[t.name].append(np.broadcast_to(np.asarray(ex.get("label_known", {}).get(t.name, True)), y.shape))
        info = {"examples": n, "presence_rate": {k: round(float(v.mean()), 4) for k, v in present.items()},
                "labels": {}, "missing_rate": {}, "text_tokens": {}}
        for t in spec.tasks:
            y, k = np.stack(labels[t.name]), np.stack(known[t.name]).astype(bool)
            if t.kind == "regression":
                v = y[k]
                info["labels"][t.name] = {"mean": round(float(v.mean()), 3), "std": round(float(v.std()), 3),
                                          "min": round(float(v.min()), 3), "max": round(float(v.max()), 3)}
            elif t.kind == "multiclass":
                counts = np.bincount(y[k].astype(np.int64), minlength=t.num_outputs)
                info["labels"][t.name] = dict(zip(t.label_names, (counts / max(k.sum(), 1)).round(4).tolist()))
            elif t.kind == "multilabel":
                rate = (y * k).sum(0) / np.maximum(k.sum(0), 1)
                info["labels"][t.name] = dict(zip(t.label_names, rate.round(4).tolist()))
            else:
                info["labels"][t.name] = {"positive_rate": round(float(y[k].mean()), 4),
                                          "known_rate": round(float(k.mean()), 4)}
        for m in spec.modalities:
            if m.name in numeric:
                rows = numeric[m.name][present[m.name]]
                info["missing_rate"][m.name] = dict(zip(m.numeric, np.isnan(rows).mean(0).round(4).tolist()))
            if m.name in tokens and tokens[m.name]:
                t = tokens[m.name]
                info["text_tokens"][m.name] = {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)),
                                               "max": int(max(t))}
        out["splits"][split] = info
    return out


def print_summary(summary: dict) -> None:
    print(f"{summary['dataset']} v{summary['version']} in {summary['data_dir']}")
    for split, s in summary["splits"].items():
        print(f"\n[{split}] {s['examples']} examples")
        print("  present: " + "  ".join(f"{k} {v:.1%}" for k, v in s["presence_rate"].items()))
        for task, dist in s["labels"].items():
            print(f"  {task}: " + "  ".join(f"{k} {v:g}" for k, v in dist.items()))
        for name, rates in s["missing_rate"].items():
            worst = sorted(rates.items(), key=lambda kv: -kv[1])[:4]
            print(f"  {name} most often missing: " + ", ".join(f"{k} {v:.0%}" for k, v in worst))
        for name, t in s["text_tokens"].items():
            print(f"  {name} tokens: median {t['p50']:.0f}, p99 {t['p99']:.0f}, max {t['max']}")


def define_flags() -> None:
    """The command's flags, defined when it runs (not at import, so modules with flags of the same
    name can be imported together)."""
    sources.define_dataset_flags()
    flags.adopt_module_key_flags(sources)  # listed in --helpshort with the command's own
    flags.DEFINE_string("json", None, "Also write the summary to this JSON file.")


def main(argv):
    del argv
    summary = summarize(sources.load_builder(FLAGS.dataset, FLAGS.data_dir))
    print_summary(summary)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    define_flags()
    run(main)
