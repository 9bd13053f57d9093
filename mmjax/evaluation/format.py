"""What the console shows of an evaluation: the metrics with their intervals, and robustness."""

from __future__ import annotations


def interval_rows(rec: dict, tasks) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, interval low, high) of the main metrics of every task (None: no interval); a
    metric is named by its path in the results ('diagnosis.labels.pneumonia.auroc'), the name that
    `best_metric`, `sweep.metric` and `python -m mmjax.evaluation.compare` use."""
    point, ci = rec["metrics"], rec.get("ci", {})
    rows = []

    def add(path, name=None):
        name = name or ".".join(path)
        value, c = point, ci
        for key in path:
            value, c = value[key], (c or {}).get(key)
        value = float("nan") if value is None else value
        defined = c and c.get("low") is not None and c.get("high") is not None
        rows.append((name, value, *((c["low"], c["high"]) if defined else (None, None))))

    add(["macro_auroc"], "macro_auroc (all binary outputs)")
    for t in tasks:
        if t.kind == "multilabel":
            add([t.name, "macro_auroc"])
            for label in t.label_names:
                add([t.name, "labels", label, "auroc"])
        elif t.kind == "binary":
            for m in ("auroc", "auprc"):
                add([t.name, m])
        elif t.kind == "multiclass":
            for m in ("accuracy", "macro_auroc"):
                add([t.name, m])
        else:
            add([t.name, "mae"])
    return rows


def format_intervals(rec: dict, tasks) -> str:
    """The metrics table with each value's interval: 'value [low, high]'."""
    rows = [(n, f"{v:.4f}" + (f"  [{lo:.4f}, {hi:.4f}]" if lo is not None else "")
             + ("  (undefined: one class only among this split's known labels)" if v != v else ""))
            for n, v, lo, hi in interval_rows(rec, tasks)]
    width = max(len(r[0]) for r in rows)
    level = rec.get("bootstrap", {}).get("level", 0.95)
    head = f"{'metric':<{width}}  value" + (f"  [{level:.0%} CI, patient bootstrap]" if rec.get("ci") else "")
    return "\n".join([head] + [f"{n:<{width}}  {c}" for n, c in rows])


def presence_rate(out: dict, modality: str) -> float:
    """The fraction of the split's patients with `modality` present (from `analyze`'s output)."""
    return out["presence"]["present"][modality] / max(out["presence"]["patients"], 1)


def format_robustness(out: dict, metric: str = "macro_auroc") -> str:
    """`metric` with each modality alone, left out, and its Shapley share; noise and missing curves."""
    names = out["modalities"]
    flat = {tuple(s["present"]): s["metrics"] for s in out["subsets"]}
    full = flat[tuple(names)][metric]
    lines = [f"{metric}: all modalities {full:.4f}, none {flat[()][metric]:.4f}",
             f"{'modality':<12} {'present':>8} {'alone':>8} {'left out':>9} {'Shapley':>8}  missing 0..100%  /  "
             "noise sigma"]
    for m in names:
        present = f"{presence_rate(out, m):>8.1%}" if "presence" in out else f"{'?':>8}"
        shap = out.get("shapley_metrics", {}).get(m, {}).get(metric, float("nan"))
        miss = " ".join(f"{x['metrics'][metric]:.3f}" for x in out["missing_fraction"][m])
        noise = " ".join(f"{x['sigma']:g}:{x['metrics'][metric]:.3f}" for x in out.get("noise", {}).get(m, []))
        left = flat[tuple(n for n in names if n != m)][metric]
        lines.append(f"{m:<12} {present} {flat[(m,)][metric]:>8.4f} {left:>9.4f} {shap:>8.4f}  {miss}  /  "
                     f"{noise or '-'}")
    return "\n".join(lines)
