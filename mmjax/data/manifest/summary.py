"""What `python -m mmjax.data.manifest` prints: rows per split, presence per modality, label
distribution, numeric ranges, unseen categories, text lengths and skipped rows."""

from __future__ import annotations

import numpy as np

from mmjax.data.spec import DatasetSpec


def describe_modality(m) -> str:
    if m.kind == "image":
        return f"{m.name} (image {m.shape[0]}x{m.shape[1]}x{m.shape[2]})"
    if m.kind == "text":
        counts = np.asarray(m.length_counts)
        cdf = np.cumsum(counts) / max(counts.sum(), 1)
        median = int(np.searchsorted(cdf, 0.5))
        return (f"{m.name} (text, vocabulary {m.vocab_size}, training texts: median {median} tokens, "
                f"max {len(counts) - 1})")
    if m.kind == "tabular":
        return f"{m.name} (tabular, {len(m.numeric)} numeric, {len(m.categorical)} categorical)"
    ch = ",".join(m.channel_names) if m.channel_names else str(m.shape[1])
    return f"{m.name} (signal, {m.shape[0]} steps at {m.rate:g} Hz, channels {ch})"


def format_summary(spec: DatasetSpec, summary: dict, where: str) -> str:
    lines = [f"{spec.name} in {where}: {summary['rows']} rows, {summary['kept']} kept, "
             f"{summary['skipped_rows']} skipped"]
    lines.append("modalities: " + "; ".join(describe_modality(m) for m in spec.modalities))
    tasks = [f"{t.name} ({t.kind}" + (f", {len(t.label_names)} classes)" if t.label_names else ")")
             for t in spec.tasks]
    lines.append("tasks: " + "; ".join(tasks))
    for split, s in summary.get("splits", {}).items():
        lines.append(f"[{split}] {s['examples']} examples")
        lines.append("  present: " + "  ".join(f"{k} {v:.1%}" for k, v in s["present"].items()))
        for task, dist in s["labels"].items():
            lines.append(f"  {task}: " + ", ".join(f"{k} {v}" for k, v in dist.items()))
        for col, r in s["numeric"].items():
            rng = f"[{r['min']:g}, {r['max']:g}]" if r["min"] is not None else "[no values]"
            lines.append(f"  {col}: {rng}, missing {r['missing']:.1%}")
    for mod, cols in summary.get("unseen_categories", {}).items():
        for col, per in cols.items():
            lines.append(f"unseen categories of {mod}.{col} (not in training; embedded as 'unseen'): "
                         + ", ".join(f"{k} {v}" for k, v in per.items()))
    return "\n".join(lines)
