"""The report of a trained workdir: one self-contained HTML page (figures embedded as PNG).

    python launch.py --workdir=W --mode=report [--split=test] [--step=N] [--explain=4]

`W/report/index.html` shows the run's config and data summary, the metrics with their bootstrap
intervals, ROC and precision-recall curves, confusion matrices of multiclass tasks, reliability
diagrams before and after temperature scaling, the classical baselines beside the model, the privacy a
DP-SGD run spent, every metric per subgroup (sex, age band, site, modality subset) with the gap's test, robustness
to missing and noisy modalities, Shapley values over modalities, and a few patients: image heatmaps
of integrated gradients, highlighted text, tabular bars and signal saliency, plus what the
cross-attention fusion attended to. Each figure is also written as `W/report/<name>.png`.

What it shows comes from `W/eval/` (`mmjax/evaluation/evaluate.py`): files of another checkpoint step,
or missing ones, are computed first (evaluation, robustness and Shapley, attributions). Plots are
drawn with matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import os

from mmjax.evaluation import figures
from mmjax.evaluation.evaluate import evaluate
from mmjax.evaluation.format import format_robustness, interval_rows, presence_rate
from mmjax.evaluation.predictor import Predictor
from mmjax.evaluation.records import load_predictions
from mmjax.experiment import RESULTS_FILE

_FIGURES = [("roc", "ROC curves"), ("pr", "Precision-recall curves"), ("confusion", "Confusion matrices"),
            ("reliability", "Reliability diagrams (before and after temperature scaling, fitted on validation)"),
            ("robustness", "Robustness to missing and noisy modalities"), ("shapley", "Shapley values over modalities")]


def build_report(workdir: str, split: str = "test", step: int | None = None, explain: int = 4,
                 output: str = "", patients=(), baselines: bool = True, groups=()) -> str:
    """Writes `W/report/index.html` (and each figure as PNG beside it); returns its path."""
    run = Predictor.from_workdir(workdir, step)
    done = evaluate(run, split, explain=explain, output=output, patients=patients, reuse=True,
                    with_baselines=baselines, groups=groups)
    rec, rob, ex = done["record"], done["robustness"], done["explanation"]
    versus = done["baselines"]
    preds, labels, masks, _ = load_predictions(run.workdir, split, run.tasks)
    drawn = {"roc": figures.roc_figure(preds, labels, masks, run.tasks),
             "pr": figures.pr_figure(preds, labels, masks, run.tasks),
             "confusion": figures.confusion_figure(rec, run.tasks), "reliability": figures.reliability_figure(rec),
             "robustness": figures.robustness_figure(rob), "shapley": figures.shapley_figure(rob, run.tasks),
             "subgroups": figures.subgroup_figure(done["subgroups"], rec["metrics"])}
    out_dir = os.path.join(run.workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    images = {}
    for name, fig in drawn.items():
        if fig is not None:
            images[name] = figures.png(fig)
            with open(os.path.join(out_dir, f"{name}.png"), "wb") as f:
                f.write(images[name])
    patients = figures.patient_figures(ex, run.spec, run.tasks) if ex is not None else []
    for k, (_, data, _) in enumerate(patients):
        if data:
            with open(os.path.join(out_dir, f"patient{k}.png"), "wb") as f:
                f.write(data)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(_page(run, split, rec, rob, images, patients, versus, done["subgroups"]))
    return path


def figure_html(name: str, data: bytes) -> str:
    return (f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}"></figure>')


def baselines_section(versus: dict | None) -> str:
    """The classical baselines beside the model: the verdict and the table (`mmjax/evaluation/baselines.py`)."""
    if versus is None:
        return ("<h2>Classical baselines</h2><p>Not fitted (<code>--config.eval.baselines=False</code> or "
                "<code>--baselines=false</code>, or they failed: see the console).</p>")
    from mmjax.evaluation.baselines import format_table

    return ("<h2>Classical baselines</h2><p>Fitted on the training split; each one's settings and the best of "
            f"them chosen on {html.escape(versus['chosen_on'])} (mmjax/evaluation/baselines.py).</p>"
            f"<p><b>{html.escape(versus['verdict'])}</b></p><pre>{html.escape(format_table(versus))}</pre>")


def privacy_section(workdir: str) -> str:
    """The privacy a DP-SGD run spent (`results.json`'s `run.privacy`), or nothing for an ordinary run."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        spent = json.load(f).get("run", {}).get("privacy")
    if not spent:
        return ""
    return ("<h2>Differential privacy</h2><p>DP-SGD (mmjax/training/privacy.py): <b>epsilon "
            f"{spent['epsilon']:.3g} at delta {spent['delta']:.2e}</b> after {spent['steps']} steps "
            f"({html.escape(spent['adjacency'])}; {html.escape(spent['accountant'])}); noise multiplier "
            f"{spent['noise_multiplier']:.4g}, clip norm {spent['clip_norm']:g}, {html.escape(spent['sampling'])} "
            f"sampling at rate {spent['sampling_rate']:.4g}. The preprocessing's statistics and vocabulary and the "
            "classical baselines are not private.</p>")


def subgroups_section(result: dict, image: bytes | None) -> str:
    """Per-group results (`mmjax/evaluation/subgroups.py`): the figure and the table with the gaps."""
    from mmjax.evaluation.subgroups import format_table

    text = format_table(result)
    if not text:
        return "<h2>Who the model fails: subgroups</h2><p>No group variable with two groups of enough patients.</p>"
    return ("<h2>Who the model fails: subgroups</h2><p>Each group's metric with its patient-level bootstrap "
            f"interval (groups of at least {result['min_patients']} patients); the gap is the best group minus the "
            f"worst, its p-value from {result['permutations']} permutations of the patients' groups. Full "
            "results, per-group calibration included, in <code>eval/&lt;split&gt;_subgroups.json</code>.</p>"
            + (figure_html("subgroups", image) if image else "") + f"<pre>{html.escape(text)}</pre>")


def _page(run, split: str, rec: dict, rob: dict, images: dict, patients: list, versus: dict | None = None,
          by_group: dict | None = None) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(n)}</td><td>{v:.4f}</td><td>{'' if lo is None else f'[{lo:.4f}, {hi:.4f}]'}"
                   f"</td></tr>" for n, v, lo, hi in interval_rows(rec, run.tasks))
    points = "".join(
        f"<tr><td>{esc(n)}</td><td>{p['threshold']:.3f}</td><td>{p['sensitivity']:.3f}</td>"
        f"<td>{p['specificity']:.3f}</td><td>{p['ppv']:.3f}</td><td>{p['npv']:.3f}</td></tr>"
        for n, p in rec.get("operating_points", {}).items() if "threshold" in p and None not in (
            p["sensitivity"], p["specificity"], p["ppv"], p["npv"]))
    spec = run.spec
    rate = lambda m: f"{presence_rate(rob, m):.1%}" if "presence" in rob else "?"
    data_rows = "".join(f"<tr><td>{esc(m.name)}</td><td>{m.kind}</td><td>{rate(m.name)}</td></tr>" for m in
                        spec.select_modalities(run.modalities))
    task_rows = "".join(f"<tr><td>{esc(t.name)}</td><td>{t.kind}</td><td>{esc(', '.join(t.label_names))}</td></tr>"
                        for t in run.tasks)
    boot = rec.get("bootstrap", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>mmjax report: {esc(os.path.basename(run.workdir))}</title>",
        "<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
        "img{max-width:100%}figure{margin:0.5em 0}pre{background:#f6f6f6;padding:0.5em;font-size:12px}</style>",
        "</head><body>",
        f"<h1>{esc(run.workdir)}</h1>",
        f"<p>{esc(split)} split, checkpoint step {run.step} ({esc(run.chosen)}); dataset {esc(spec.name)}, "
        f"split sizes {esc(json.dumps(spec.split_sizes))}; fusion {esc(str(run.config.model.fusion.name))}.</p>",
        "<h2>Data</h2><table><tr><th>modality</th><th>kind</th>"
        f"<th>present ({esc(split)}, {rob.get('presence', {}).get('patients', '?')} patients)</th></tr>"
        + data_rows + "</table>",
        "<table><tr><th>task</th><th>kind</th><th>labels</th></tr>" + task_rows + "</table>",
        "<h2>Metrics</h2>",
        f"<p>{boot.get('level', 0.95):.0%} intervals from {boot.get('resamples', 0)} patient-level bootstrap "
        f"resamples ({boot.get('patients', '?')} patients).</p>" if boot else "<p>No bootstrap intervals.</p>",
        "<table><tr><th>metric</th><th>value</th><th>interval</th></tr>" + rows + "</table>",
        "<h3>Operating points (thresholds chosen on validation)</h3>",
        "<table><tr><th>output</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV</th>"
        "<th>NPV</th></tr>" + points + "</table>",
        baselines_section(versus),
        privacy_section(run.workdir),
    ]
    if by_group is not None:
        parts.append(subgroups_section(by_group, images.get("subgroups")))
    for name, title in _FIGURES:
        if name in images:
            parts.append(f"<h2>{esc(title)}</h2>" + figure_html(name, images[name]))
    parts.append(f"<pre>{esc(format_robustness(rob))}</pre>")
    if patients:
        parts.append("<h2>Patients</h2><p>Integrated gradients (red raises the output, blue lowers it) and, with "
                     "cross-attention fusion, the attention each modality's tokens received from the others.</p>")
        for k, (caption, data, texts) in enumerate(patients):
            parts.append(f"<h3>{esc(caption)}</h3>")
            if data:
                parts.append(figure_html(f"patient{k}", data))
            parts.append(texts)
    parts.append("<h2>Config</h2><details><summary>config.json</summary><pre>"
                 f"{esc(run.config.to_json_best_effort(indent=2, sort_keys=True))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)

