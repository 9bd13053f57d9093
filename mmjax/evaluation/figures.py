"""The evaluation's figures (matplotlib, Agg backend: no display needed), each from the evaluation
files' contents: ROC and precision-recall curves, confusion matrices, reliability diagrams,
robustness, Shapley values, and a patient's attributions and attention. `png(fig)` gives the bytes
that the report embeds and TensorBoard shows.
"""

from __future__ import annotations

import html
import io

import numpy as np

from mmjax import metrics
from mmjax.metrics import calibration

MAX_PANELS = 12  # binary outputs drawn per figure (the first ones)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int, size: float = 3.2):
    plt = _plt()
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()


def _curve_panels(preds, labels, masks, tasks):
    """(figure, [(axes, task, [(label, y, p)])]): one panel per task with binary outputs of both classes
    (binary tasks, multilabel labels, multiclass classes one-vs-rest); None when there is none."""
    outputs = calibration.binary_outputs(preds, labels, masks, tasks, one_vs_rest=True)
    by_task = {}
    for name, task, y, p in outputs:
        if 0 < np.sum(y) < len(y):
            by_task.setdefault(task, []).append((name.partition(".")[2] or name, y, p))
    if not by_task:
        return None, []
    fig, axes = _grid(len(by_task))
    return fig, [(ax, task, members) for ax, (task, members) in zip(axes, by_task.items())]


def roc_figure(preds, labels, masks, tasks):
    """ROC curves: one panel per task, a line per output, AUROC in the legend."""
    fig, panels = _curve_panels(preds, labels, masks, tasks)
    for ax, task, members in panels:
        for label, y, p in members:
            fpr, tpr, _ = metrics.roc_curve(y, p)
            ax.plot(fpr, tpr, lw=1.4, label=f"{label} {metrics.roc_auc(y, p):.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(title=f"{task}: ROC", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
               ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    return fig


def pr_figure(preds, labels, masks, tasks):
    """Precision-recall curves, average precision in the legend, prevalence dotted."""
    fig, panels = _curve_panels(preds, labels, masks, tasks)
    for ax, task, members in panels:
        for label, y, p in members:
            precision, recall, _ = metrics.precision_recall_curve(y, p)
            line, = ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="pre", lw=1.4,
                            label=f"{label} {metrics.average_precision(y, p):.3f}")
            ax.axhline(np.mean(y), color=line.get_color(), lw=0.6, ls=":")
        ax.set(title=f"{task}: precision-recall", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="upper right", title="AP", title_fontsize=7)
    return fig


def confusion_figure(rec: dict, tasks):
    """Confusion matrices (rows: true class, normalized per row) of multiclass tasks, over the classes
    that occur in the labels or predictions; counts printed up to 12 classes."""
    multi = [t for t in tasks if t.kind == "multiclass"]
    if not multi:
        return None
    matrices = [np.asarray(rec["metrics"][t.name]["confusion_matrix"], np.float64) for t in multi]
    occurring = [np.flatnonzero(cm.sum(0) + cm.sum(1) > 0) for cm in matrices]
    fig, axes = _grid(len(multi), max(3.8, 0.3 * max(map(len, occurring)) + 1.5))
    for ax, t, cm, used in zip(axes, multi, matrices, occurring):
        cm = cm[np.ix_(used, used)]
        names = [t.label_names[k] for k in used]
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if len(used) <= 12:
            for i in range(len(cm)):
                for j in range(len(cm)):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
        ticks = range(len(names))
        ax.set_xticks(ticks, names, rotation=90 if len(names) > 12 else 45, ha="center" if len(names) > 12
                      else "right", fontsize=7)
        ax.set_yticks(ticks, names, fontsize=7)
        ax.set(title=f"{t.name} (accuracy {rec['metrics'][t.name]['accuracy']:.3f}; {len(used)} of "
                     f"{len(t.label_names)} classes occur)", xlabel="predicted", ylabel="true")
    return fig


def reliability_figure(rec: dict):
    """Reliability diagrams of the binary outputs, before and after temperature scaling."""
    calib = rec.get("calibration", {})
    names = list(calib)[:MAX_PANELS]
    if not names:
        return None
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        c = calib[name]
        task = name.split(".")[0]
        temperature = rec.get("temperature", {}).get(task)
        fitted = temperature is not None and np.isfinite(temperature)
        for key, label, style in (("reliability", f"raw ECE {c['ece']:.3f}", "o-"),
                                  ("reliability_scaled", f"T={temperature:.2f} ECE {c['ece_scaled']:.3f}"
                                   if fitted else "no temperature fitted", "s--")):
            r = c[key]
            x = np.array(r["mean_predicted"], dtype=float)
            y = np.array(r["observed"], dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            ax.plot(x[ok], y[ok], style, ms=3, lw=1.2, label=label)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(title=name, xlabel="mean predicted", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    return fig


def robustness_figure(rob: dict, metric: str = "macro_auroc"):
    """`metric` as a fraction of patients lose each modality, under noise, and with each modality alone
    or left out."""
    plt = _plt()
    names = rob["modalities"]
    flat = {tuple(s["present"]): s["metrics"] for s in rob["subsets"]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for j, m in enumerate(names):  # a modality keeps its colour across the panels
        curve = rob["missing_fraction"][m]
        axes[0].plot([c["fraction"] for c in curve], [c["metrics"][metric] for c in curve], "o-", ms=3, label=m,
                     color=f"C{j}")
        if m in rob.get("noise", {}):
            curve = rob["noise"][m]
            axes[1].plot([0] + [c["sigma"] for c in curve], [flat[tuple(names)][metric]] +
                         [c["metrics"][metric] for c in curve], "o-", ms=3, label=m, color=f"C{j}")
    axes[0].set(title="patients missing the modality", xlabel="fraction of patients", ylabel=metric)
    axes[1].set(title="Gaussian noise on the inputs", xlabel="noise sigma (standardized units)", ylabel=metric)
    x = np.arange(len(names))
    alone = [flat[(m,)][metric] for m in names]
    left = [flat[tuple(n for n in names if n != m)][metric] for m in names]
    axes[2].bar(x - 0.2, alone, 0.4, label="alone")
    axes[2].bar(x + 0.2, left, 0.4, label="left out")
    axes[2].axhline(flat[tuple(names)][metric], color="k", lw=0.8, label="all")
    low = np.nanmin(alone + left + [flat[()][metric]])
    axes[2].set_ylim(max(0.0, low - 0.05), None)
    axes[2].set_xticks(x, names)
    axes[2].set(title="one modality alone / left out", ylabel=metric)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def subgroup_figure(result: dict, overall: dict | None = None, metric: str = "macro_auroc"):
    """One panel per group variable of a subgroup analysis (`subgroups.py`): each group's metric with its
    interval, the whole split's value as a line, and the gap's permutation p-value in the title."""
    from mmjax.evaluation import subgroups

    shown = {k: v for k, v in result["variables"].items() if v["groups"]}
    if not shown:
        return None
    plt = _plt()
    heights = [max(1.6, 0.35 * len(v["groups"]) + 0.9) for v in shown.values()]
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, var) in zip(axes[:, 0], shown.items()):
        m = subgroups.shown(var, metric)
        names = list(var["groups"])
        vals = np.array([subgroups.value_and_interval(var["groups"][g], m) for g in names])
        y = np.arange(len(names))[::-1]
        err = np.abs(np.stack([vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]]))
        ax.errorbar(vals[:, 0], y, xerr=np.nan_to_num(err), fmt="o", ms=4, capsize=3)
        ax.set_yticks(y, [f"{g} (n={var['groups'][g]['patients']})" for g in names])
        if overall is not None:
            try:
                ax.axvline(float(subgroups._get(overall, m)), color="k", lw=0.8, ls="--", label="all patients")
                ax.legend(fontsize=7, loc="best")
            except (KeyError, TypeError):
                pass
        gap = var["gaps"].get(m)
        note = f"; gap {gap['gap']:.3f}, permutation p={gap.get('p_value', float('nan')):.3g}" if gap else ""
        ax.set_title(f"{name}: {m}{note}", fontsize=9)
    return fig


def shapley_figure(rob: dict, tasks, metric: str = "macro_auroc"):
    """Shapley values over modalities of `metric` (summing to all minus none), next to the
    leave-one-out deltas; and the mean |Shapley| of each output per modality."""
    plt = _plt()
    if "shapley_metrics" not in rob:
        return None
    names = rob["modalities"]
    shap = rob["shapley"]
    regression = {t.name for t in tasks if t.kind == "regression"}  # in target units: another scale
    outputs = [o for o in shap["outputs"] if o not in regression][:MAX_PANELS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [rob["shapley_metrics"][m][metric] for m in names], 0.4, label="Shapley")
    axes[0].bar(x + 0.2, [rob["leave_one_out"][m][metric] for m in names], 0.4, label="leave-one-out delta")
    axes[0].set_xticks(x, names)
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set(title=f"modality contribution to {metric}", ylabel=metric)
    axes[0].legend(fontsize=7)
    values = np.array([[shap["mean_abs"][m][o] for o in outputs] for m in names])
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        axes[1].bar(np.arange(len(outputs)) + (i - (len(names) - 1) / 2) * width, values[i], width, label=m)
    axes[1].set_xticks(np.arange(len(outputs)), outputs, rotation=30, ha="right", fontsize=7)
    axes[1].set(title="mean |Shapley value| of each probability (per patient)", ylabel="probability")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def attention_received(w: np.ndarray, seg: np.ndarray, target: int, queries: np.ndarray | None = None) -> np.ndarray:
    """Attention the tokens of modality `target` received, from `w` [queries, tokens] (mean over heads):
    with token-to-token attention (cross-attention fusion: queries are tokens, `seg` their modality)
    from the valid `queries` of the other modalities; with latent queries (perceiver) from every latent."""
    keys = seg == target
    if w.shape[0] != len(seg):  # latent queries
        return w[:, keys].sum(0)
    rows = (seg != target) & (np.ones(len(seg), bool) if queries is None else queries)
    return w[rows][:, keys].sum(0)


def _valid_queries(ex: dict, i: int, names: list, seg: np.ndarray) -> np.ndarray:
    """Tokens of patient i's present modalities (text: its real tokens): the queries that attend."""
    valid = np.zeros(len(seg), bool)
    for j, m in enumerate(names):
        idx = np.flatnonzero(seg == j)
        if not ex[f"present/{m}"][i]:
            continue
        tokens = ex.get(f"tokens/{m}")
        if tokens is not None and len(tokens[i]) == len(idx):
            valid[idx] = tokens[i] != ""
        else:
            valid[idx] = True
    return valid


def patient_figures(ex: dict, spec, tasks) -> list[tuple[str, bytes, str]]:
    """Per explained patient: (caption, PNG of the image/tabular/signal attributions, HTML of the text
    attributions and attention)."""
    names = [str(m) for m in ex["modalities"]]
    kinds = dict(zip(names, [str(k) for k in ex["kinds"]]))
    has_att = "attention" in ex
    seg = np.asarray(ex["token_modality"]) if has_att else None
    out = []
    for i, pid in enumerate(ex["patient_id"]):
        if has_att:
            w, queries = ex["attention"][i, -1], _valid_queries(ex, i, names, seg)  # the last layer
            received = lambda j: attention_received(w, seg, j, queries)  # noqa: B023 (used in this iteration)
        panels = [m for m in names if kinds[m] != "text" and ex[f"present/{m}"][i]]
        extra = [m for m in panels if kinds[m] == "image" and has_att]
        fig, axes = _grid(max(len(panels) + len(extra), 1), 3.4)
        k = 0
        for m in panels:
            a = ex[f"attribution/{m}"][i]
            ax = axes[k]
            k += 1
            if kinds[m] == "image":
                img = np.asarray(ex[f"input/{m}"][i], np.float64)
                img = img.mean(-1) if img.ndim == 3 else img
                ax.imshow(img, cmap="gray")
                lim = np.abs(a).max() or 1.0
                ax.imshow(a, cmap="bwr", alpha=0.5, vmin=-lim, vmax=lim)
                ax.set(title=f"{m}: integrated gradients", xticks=[], yticks=[])
            elif kinds[m] == "tabular":
                ms = spec.modality(m)
                a = np.asarray(a).reshape(len(a), -1).sum(-1) if np.ndim(a) > 1 else np.asarray(a)
                labels = next((c for c in (list(ms.numeric), list(ms.numeric) + list(ms.categorical))
                               if len(c) == len(a)), [str(j) for j in range(len(a))])
                ax.barh(np.arange(len(a)), a, color=np.where(a >= 0, "tab:red", "tab:blue"))
                ax.set_yticks(np.arange(len(a)), labels, fontsize=7)
                ax.invert_yaxis()
                ax.set(title=f"{m}: attribution per feature")
            else:
                x = np.asarray(ex[f"input/{m}"][i], np.float64)
                x = x.reshape(-1, x.shape[-1])
                t = np.arange(len(x))
                ax.plot(t, x[:, 0], color="0.3", lw=0.8)
                s = np.asarray(a, np.float64).reshape(-1)[:len(t)]
                ax2 = ax.twinx()
                ax2.fill_between(t[:len(s)], 0, s, color="tab:red", alpha=0.4)
                ax2.set_yticks([])
                ax.set(title=f"{m}: channel 0 and |saliency|", xlabel="sample")
        for m in extra:
            att = received(names.index(m))
            side = int(round(np.sqrt(len(att))))
            ax = axes[k]
            k += 1
            if side * side == len(att):
                ax.imshow(att.reshape(side, side), cmap="magma")
                ax.set(title=f"{m}: attention from other modalities", xticks=[], yticks=[])
            else:
                ax.bar(np.arange(len(att)), att)
                ax.set(title=f"{m}: attention per token")
        texts = []
        for m in names:
            if kinds[m] != "text" or not ex[f"present/{m}"][i]:
                continue
            tokens = [str(w) for w in ex[f"tokens/{m}"][i]]
            texts.append(f"<p><b>{html.escape(m)}</b> (integrated gradients): "
                         f"{_highlight(tokens, ex[f'attribution/{m}'][i])}</p>")
            if has_att:
                texts.append(f"<p><b>{html.escape(m)}</b> (attention from other modalities): "
                             f"{_highlight(tokens, received(names.index(m))[:len(tokens)], signed=False)}</p>")
        caption = (f"patient {pid}: {ex['output']} = {float(ex['f_input'][i]):.3f} (baseline "
                   f"{float(ex['f_baseline'][i]):.3f}; completeness gap {float(ex['completeness_gap'][i]):.1e})")
        out.append((caption, png(fig) if panels else b"", "\n".join(texts)))
    return out


def _highlight(tokens: list[str], values, signed: bool = True) -> str:
    """Tokens as HTML spans shaded by value (red positive, blue negative)."""
    values = np.asarray(values, np.float64)[:len(tokens)]
    lim = np.abs(values).max() or 1.0
    spans = []
    for tok, v in zip(tokens, values):
        if not tok:
            continue
        a = min(abs(v) / lim, 1.0)
        color = f"rgba(220,40,40,{a:.2f})" if v >= 0 or not signed else f"rgba(40,80,220,{a:.2f})"
        spans.append(f'<span title="{v:+.3g}" style="background:{color}">{html.escape(tok)}</span>')
    return " ".join(spans)


def main_figures(collected, rec: dict, tasks) -> dict:
    """The figures TensorBoard gets at the end of training: {name: PNG bytes}."""
    preds, labels, masks = collected[:3]
    figs = {"roc": roc_figure(preds, labels, masks, tasks), "reliability": reliability_figure(rec),
            "confusion": confusion_figure(rec, tasks)}
    return {k: png(f) for k, f in figs.items() if f is not None}
