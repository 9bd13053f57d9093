"""Classical baselines beside every result: does the deep model beat logistic regression?

At the end of training and in `--mode=evaluate`, on the same split and the same patients, mmjax fits
the field's standard non-deep models with scikit-learn and compares the deep model with the best:

- tabular: gradient boosting (`HistGradientBoosting*`; missing values and categories handled natively)
  on the raw columns (NaN where not measured; categories as categories);
- text: TF-IDF (words and bigrams, fitted on the training notes) plus logistic (ridge) regression;
- signal: per-channel statistics and band powers (Welch) for any signal; for an ECG (a modality named
  ecg/ekg, or with lead names) also R-peak, heart-rate-variability and interval features from
  `neurokit2` (heart rate, SDNN, RMSSD, pNN50, ...; PR, QRS, QT from a delineation); gradient boosting;
- image: a 16x16 thumbnail of the grey levels, a 16-bin intensity histogram and per-channel mean and
  standard deviation, standardized, plus logistic (ridge) regression;
- each modality alone (a row without it gets the training prior), a late fusion (the mean of the
  present modalities' predictions), and the trivial baselines: the majority class and the training
  prior probabilities (the training mean for a regression).

The baselines are fitted on the training split only (features, vocabularies, scalers and models) and
use the validation split the way mmjax does: each model's setting is chosen from a small grid by its
validation metric (AUROC, or RMSE for a regression), and the best baseline by the run's `best_metric`
on validation. Its test metrics get the same patient-level bootstrap intervals as the deep model's,
and the two are compared on the same resamples (paired difference and p-value; DeLong's test per
binary output): `W/eval/<split>_baselines.json`, the baselines' predictions in
`W/eval/<split>_baselines.npz`, a line on the console and a section of the report.
`--config.eval.baselines=False` turns it off.

Each baseline sees the whole recording of a signal and the whole image at its stored size, not the
model's crop: classical features are computed the way the field computes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import numpy as np

from mmjax.config import lower_is_better, metric_value
from mmjax.data import pipeline
from mmjax.data import transforms as T
from mmjax.data.manifest.schema import looks_like_ecg
from mmjax.experiment import EVAL_DIR
from mmjax.metrics import tasks as task_metrics

SEED = 0
FORMAT = 2  # of `<split>_baselines.json`; a file of another format is computed again, not reused
TRIVIAL = ("majority class", "prior")
LATE_FUSION = "late fusion"
_HGB_GRID = ({"learning_rate": 0.1, "max_leaf_nodes": 15}, {"learning_rate": 0.05, "max_leaf_nodes": 7})
_TEXT_GRID = ({"C": 0.1}, {"C": 1.0}, {"C": 10.0})
_IMAGE_GRID = ({"C": 0.01}, {"C": 0.1})  # hundreds of correlated pixel features: strong penalties (and fast fits)
# neurokit2's delineation (PQ, QS, QT intervals) costs ~70 ms a record (pandas per beat): done when the
# splits read have at most this many rows in all (`eval.ecg_intervals_max_rows`; the small-data regime
# where baselines matter most), else left out
ECG_INTERVALS_MAX_ROWS = 2000


def enabled(config) -> bool:
    return bool((config.get("eval", None) or {}).get("baselines", True))


# ---- Features ---------------------------------------------------------------------------------------------
def is_ecg(m) -> bool:
    """Whether signal modality `m` is an ECG: named so, or its channels carry lead names."""
    return looks_like_ecg(m.name, m.channel_names)


def image_features(x: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] -> 16x16 grey thumbnail (256), 16-bin histogram, per-channel mean and std."""
    from PIL import Image

    x = np.asarray(x)
    grey = x.astype(np.float32).mean(-1)
    thumb = np.asarray(Image.fromarray(grey).resize((16, 16), Image.BOX), np.float64).ravel() / 255.0
    hist = np.histogram(grey, bins=16, range=(0, 256))[0] / grey.size
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return np.concatenate([thumb, hist, flat.mean(0), flat.std(0)])


def _band_edges(rate: float) -> np.ndarray:
    return np.geomspace(0.5, rate / 2, 7)


def signal_features(x: np.ndarray, rate: float) -> np.ndarray:
    """[T, C] -> per channel: mean, std, 5th, 50th and 95th percentile, and the relative power in six
    log-spaced bands from 0.5 Hz to Nyquist (Welch)."""
    from scipy import signal

    x = np.asarray(x, np.float64)
    stats = [x.mean(0), x.std(0), *np.percentile(x, [5, 50, 95], axis=0)]
    freqs, power = signal.welch(x, fs=rate, nperseg=min(len(x), int(4 * rate)), axis=0)
    edges = _band_edges(rate)
    total = power.sum(0) + 1e-12
    bands = [power[(freqs >= lo) & (freqs < hi)].sum(0) / total for lo, hi in zip(edges[:-1], edges[1:])]
    return np.concatenate([np.stack(stats + bands, 1).ravel()])


# P-Q, Q-S and Q-T peak to peak: the PR, QRS and QT intervals as the peak delineation can measure them
ECG_FEATURES = ("heart_rate", "rr_mean", "rr_sdnn", "rr_rmssd", "rr_pnn50", "rr_cv", "rr_min", "rr_max",
                "rr_mad_successive", "beats", "pq_ms", "qs_ms", "qt_ms")


def ecg_features(x: np.ndarray, rate: float, intervals: bool = True) -> np.ndarray:
    """One lead [T] -> `ECG_FEATURES` from neurokit2's cleaning, R-peak detection and (with `intervals`)
    peak-method delineation (else the first 10 features only); NaN where undefined (fewer than 3 beats,
    no delineation)."""
    import neurokit2 as nk

    out = np.full(len(ECG_FEATURES) if intervals else 10, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = nk.ecg_clean(np.asarray(x, np.float64), sampling_rate=int(rate))
        peaks = np.asarray(nk.ecg_peaks(cleaned, sampling_rate=int(rate))[1]["ECG_R_Peaks"], int)
        out[9] = len(peaks)
        if len(peaks) < 3:
            return out
        rr = np.diff(peaks) / rate * 1000.0
        succ = np.diff(rr)
        out[:9] = [60000.0 / rr.mean(), rr.mean(), rr.std(), np.sqrt(np.mean(succ ** 2)),
                   np.mean(np.abs(succ) > 50), rr.std() / rr.mean(), rr.min(), rr.max(), np.median(np.abs(succ))]
        if not intervals:
            return out
        try:
            waves = nk.ecg_delineate(cleaned, peaks, sampling_rate=int(rate), method="peak")[1]
        except Exception:  # noqa: BLE001  (too short or flat for a delineation: intervals stay NaN)
            return out
    ms = lambda a, b: np.nanmedian((np.asarray(waves[b], float) - np.asarray(waves[a], float)) / rate * 1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: undefined stays NaN
        out[10:] = [ms(a, b) for a, b in (("ECG_P_Peaks", "ECG_Q_Peaks"), ("ECG_Q_Peaks", "ECG_S_Peaks"),
                                          ("ECG_Q_Peaks", "ECG_T_Peaks"))]
    return out


# ---- Reading a split ----------------------------------------------------------------------------------
@dataclasses.dataclass
class SplitData:
    """One split's rows in the dataset's order: ids, per modality its presence and features (an array
    [N, D], NaN where undefined; text: the notes), labels and label masks as evaluation collects them."""

    ids: np.ndarray
    present: dict
    features: dict
    labels: dict
    masks: dict
    undefined: dict  # modality -> rows present whose features are partly undefined (e.g. < 3 beats)


def _tabular(ex, m) -> np.ndarray:
    numeric, categorical = T.tabular_parts(ex, m)
    cats = np.where(categorical == 0, np.nan, categorical.astype(np.float64))  # 0: missing
    return np.concatenate([numeric.astype(np.float64), cats])


def feature_width(m, intervals: bool = True) -> int:
    """The number of features of modality `m` (text: 0, its notes are kept as text)."""
    if m.kind == "tabular":
        return len(m.numeric) + len(m.categorical)
    if m.kind == "image":
        return 256 + 16 + 2 * m.shape[2]
    if m.kind == "signal":
        return 11 * m.shape[1] + ((len(ECG_FEATURES) if intervals else 10) if is_ecg(m) else 0)
    return 0


def read_split(builder, spec, modalities, tasks, split: str, intervals: bool = True, rows=None) -> SplitData:
    """Reads `split` of the prepared dataset (every row, or the records `rows`, checked as the pipeline
    checks them) and computes each modality's features; absent modalities give NaN features (text: '').
    `intervals`: an ECG's delineated intervals (else NaN)."""
    mods = spec.select_modalities(modalities)
    source = pipeline.CheckedSource(builder, split, rows)
    check, collect = T.CheckExample(mods, tuple(tasks)), T.CollectLabels(tuple(tasks))
    ids, present = [], {m.name: [] for m in mods}
    feats = {m.name: [] for m in mods}
    labels, masks = {t.name: [] for t in tasks}, {t.name: [] for t in tasks}
    for i in range(len(source)):
        ex = collect.map(check.map(dict(source[i])))
        pid = ex["patient_id"]
        ids.append(pid.decode("utf-8") if isinstance(pid, bytes) else str(pid))
        for t in tasks:
            labels[t.name].append(ex["out/labels"][t.name])
            masks[t.name].append(ex["out/label_mask"][t.name])
        for m in mods:
            here = bool(ex["present"][m.name])
            present[m.name].append(here)
            value = T.get_field(ex, m.field)
            if m.kind == "text":
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                feats[m.name].append(text if here else "")
                continue
            if not here:
                feats[m.name].append(None)
                continue
            if m.kind == "image":
                f = image_features(value)
            elif m.kind == "tabular":
                f = _tabular(ex, m)
            else:
                x = np.asarray(value, np.float64).reshape(-1, m.shape[1])
                f = signal_features(x, m.rate)
                if is_ecg(m):
                    names = [str(c).lower() for c in m.channel_names]
                    lead = names.index("ii") if "ii" in names else 0
                    f = np.concatenate([ecg_features(x[:, lead], m.rate, intervals), f])
            feats[m.name].append(f)
    out, undefined = {}, {}
    for m in mods:
        if m.kind == "text":
            out[m.name] = feats[m.name]
            continue
        rows = np.full((len(ids), feature_width(m, intervals)), np.nan)
        for k, f in enumerate(feats[m.name]):
            if f is not None:
                rows[k] = f
        out[m.name] = rows
        here = np.asarray(present[m.name], bool)
        undefined[m.name] = int(np.isnan(rows[here]).any(1).sum()) if m.kind != "tabular" else 0
    stack = lambda d: {k: np.asarray(np.stack(v) if v else np.zeros(0), np.float64) for k, v in d.items()}
    return SplitData(np.asarray(ids), {k: np.asarray(v, bool) for k, v in present.items()}, out, stack(labels),
                     {k: np.asarray(np.stack(v) if v else np.zeros(0), bool) for k, v in masks.items()}, undefined)


# ---- Models -------------------------------------------------------------------------------------------------
def _method(m) -> str:
    return {"tabular": "gradient boosting", "text": "TF-IDF + logistic regression",
            "image": "pixel features + logistic regression",
            "signal": ("ECG features (neurokit2)" if is_ecg(m) else "signal features") + " + gradient boosting"}[m.kind]


def _estimator(m, kind: str, setting: dict, categorical=None, rows: int = 1000):
    """A scikit-learn model for modality `m` and output kind ('binary', 'multiclass', 'regression'), to be
    fitted on `rows` rows: gradient boosting's leaves hold at least min(20, rows / 10) rows (at least 3;
    scikit-learn's 20 left a 36-row training fold without a single split: every prediction the prior)."""
    from sklearn import ensemble, linear_model, preprocessing
    from sklearn import pipeline as skpipe

    if m.kind in ("tabular", "signal"):
        common = dict(max_iter=100, early_stopping=False, random_state=SEED, categorical_features=categorical,
                      min_samples_leaf=max(3, min(20, rows // 10)), **setting)
        return (ensemble.HistGradientBoostingRegressor(**common) if kind == "regression"
                else ensemble.HistGradientBoostingClassifier(**common))
    model = (linear_model.Ridge(alpha=1.0 / setting["C"]) if kind == "regression"
             else linear_model.LogisticRegression(C=setting["C"], max_iter=3000))
    if m.kind == "text":  # sparse TF-IDF rows, already unit-normalized
        return model
    return skpipe.make_pipeline(preprocessing.StandardScaler(), model)


def _grid(m) -> tuple:
    return {"tabular": _HGB_GRID, "signal": _HGB_GRID, "text": _TEXT_GRID, "image": _IMAGE_GRID}[m.kind]


def _categorical(m):
    """HistGradientBoosting's categorical mask: categorical columns with fewer than 254 categories."""
    if m.kind != "tabular" or not m.categorical:
        return None
    small = [len(c) + 2 < 254 for c in m.categories]
    return np.array([False] * len(m.numeric) + small) if any(small) else None


def _score(kind: str, y, p) -> float:
    """Higher is better: AUROC (binary), one-vs-rest macro-AUROC (multiclass), -RMSE (regression)."""
    from mmjax import metrics

    if kind == "regression":
        return -float(metrics.rmse(y, p))
    if kind == "binary":
        return float(metrics.roc_auc(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return float(metrics.multiclass(y, p)["macro_auroc"]) if len(np.unique(y)) > 1 else float("nan")


def _prior(kind: str, y, classes: int):
    if kind == "regression":
        return float(np.mean(y)) if len(y) else 0.0
    if kind == "binary":
        return float(np.mean(y)) if len(y) else 0.5
    counts = np.bincount(y.astype(int), minlength=classes).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(classes, 1.0 / classes)


def _predict(model, kind: str, X, classes: int):
    if kind == "regression":
        return model.predict(X)
    proba = model.predict_proba(X)
    if kind == "binary":
        return proba[:, list(model.classes_).index(1.0)]
    out = np.zeros((X.shape[0], classes))
    out[:, np.asarray(model.classes_, int)] = proba
    return out


def _outputs(t):
    """(output kind, label column or None, number of classes) of each output of task t."""
    if t.kind == "multilabel":
        return [("binary", k, 2) for k in range(len(t.label_names))]
    return [(t.kind, None, t.num_outputs if t.kind == "multiclass" else 1)]


def _column(a, k):
    return a if k is None else a[:, k]


def _fit_modality(m, t, data: dict, X: dict, categorical) -> tuple[dict, dict]:
    """Predictions {split: [N] or [N, K]} of modality `m`'s model for task `t` (the training prior where
    the row lacks the modality), and the setting chosen on validation for each output."""
    train, val = data["train"], data.get("validation")
    preds = {s: [] for s in data}
    chosen = []
    for kind, k, classes in _outputs(t):
        y_tr, known_tr = _column(train.labels[t.name], k), _column(train.masks[t.name], k)
        rows = known_tr & train.present[m.name]
        prior = _prior(kind, y_tr[known_tr], classes)
        fitted, setting, best = None, None, -np.inf
        ok = rows.sum() >= 2 and (kind == "regression" or len(np.unique(y_tr[rows])) > 1)
        for candidate in (_grid(m) if ok else ()):
            model = _estimator(m, kind, candidate, categorical, int(rows.sum()))
            model.fit(X["train"][rows], y_tr[rows].astype(int) if kind == "multiclass" else y_tr[rows])
            if val is None:
                fitted, setting = model, candidate
                break
            vrows = _column(val.masks[t.name], k) & val.present[m.name]
            score = _score(kind, _column(val.labels[t.name], k)[vrows], _predict(
                model, kind, X["validation"][vrows], classes)) if vrows.any() else float("nan")  # else the first
            if fitted is None or score > best:
                fitted, setting, best = model, candidate, score
        chosen.append(setting if fitted is not None else "prior (fewer than two classes or rows in training)")
        for s, d in data.items():
            shape = (len(d.ids),) if kind != "multiclass" else (len(d.ids), classes)
            p = np.broadcast_to(np.asarray(prior, np.float64), shape).copy()
            if fitted is not None and d.present[m.name].any():
                p[d.present[m.name]] = _predict(fitted, kind, X[s][d.present[m.name]], classes)
            preds[s].append(p)
    stacked = {s: np.stack(v, 1) if t.kind == "multilabel" else v[0] for s, v in preds.items()}
    return stacked, {"settings": chosen}


def _trivial(t, data: dict, majority: bool) -> dict:
    """The majority class (one-hot, or 0/1 per label) or the training prior, for every row."""
    train = data["train"]
    out = {s: [] for s in data}
    for kind, k, classes in _outputs(t):
        y, known = _column(train.labels[t.name], k), _column(train.masks[t.name], k)
        p = np.asarray(_prior(kind, y[known], classes), np.float64)
        if majority and kind == "binary":
            p = np.float64(p >= 0.5)
        elif majority and kind == "multiclass":
            p = np.eye(classes)[int(np.argmax(p))]
        for s, d in data.items():
            out[s].append(np.broadcast_to(p, (len(d.ids),) + p.shape).copy())
    return {s: np.stack(v, 1) if t.kind == "multilabel" else v[0] for s, v in out.items()}


def _design(m, data: dict):
    """({split: feature matrix}, categorical mask or None) of modality m: the columns with a value in some
    training row; TF-IDF fitted on the training notes for text. None: nothing to fit on."""
    if m.kind != "text":
        keep = ~np.all(np.isnan(data["train"].features[m.name]), axis=0)
        if not keep.any():
            return None
        categorical = _categorical(m)
        if categorical is not None:
            categorical = categorical[keep] if categorical[keep].any() else None
        return {s: np.asarray(d.features[m.name])[:, keep] for s, d in data.items()}, categorical
    from sklearn.feature_extraction.text import TfidfVectorizer

    train = data["train"]
    docs = [doc for doc, here in zip(train.features[m.name], train.present[m.name]) if here]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2 if len(docs) >= 50 else 1, max_features=50000,
                          sublinear_tf=True)
    try:
        vec.fit(docs)
    except ValueError:  # no training note has a word
        return None
    return {s: vec.transform(d.features[m.name]) for s, d in data.items()}, None


def fit_predict(data: dict, spec, modalities, tasks) -> tuple[dict, dict]:
    """Fits every baseline on `data['train']` (settings chosen on `data['validation']` when given) and
    predicts every split of `data`: ({baseline: {split: {task: predictions}}}, {baseline: details}).
    Nothing of any other split than train and validation is used in fitting (tested)."""
    preds, details = {}, {}
    per_modality = []
    for m in spec.select_modalities(modalities):
        design = _design(m, data)
        if design is None:
            continue
        X, categorical = design
        name = f"{m.name}: {_method(m)}"
        started = time.perf_counter()
        fits = {t.name: _fit_modality(m, t, data, X, categorical) for t in tasks}
        preds[name] = {s: {t.name: fits[t.name][0][s] for t in tasks} for s in data}
        details[name] = {"modality": m.name, "settings": {t.name: fits[t.name][1]["settings"] for t in tasks},
                         "fit_seconds": round(time.perf_counter() - started, 2),
                         "undefined_feature_rows": {s: d.undefined.get(m.name, 0) for s, d in data.items()}}
        per_modality.append((name, m.name))
    trivial = {}
    for name in TRIVIAL:
        by_task = {t.name: _trivial(t, data, name == "majority class") for t in tasks}
        trivial[name] = {s: {k: v[s] for k, v in by_task.items()} for s in data}
    if len(per_modality) > 1:
        preds[LATE_FUSION] = {s: {t.name: _late([(preds[n][s][t.name], d.present[mod]) for n, mod in per_modality],
                                                trivial["prior"][s][t.name])
                                  for t in tasks} for s, d in data.items()}
        details[LATE_FUSION] = {"of": [n for n, _ in per_modality],
                                "rule": "mean of the present modalities' predictions (prior where none is present)"}
    for name in TRIVIAL:
        preds[name] = trivial[name]
        details[name] = {"trivial": True}
    return preds, details


def _late(parts: list, prior: np.ndarray) -> np.ndarray:
    """Mean of the modalities' predictions over those present in each row; the prior where none is."""
    total = np.zeros_like(prior)
    count = np.zeros(len(prior))
    for p, here in parts:
        total[here] += p[here]
        count += here
    out = prior.copy()
    has = count > 0
    out[has] = total[has] / count[has].reshape((-1,) + (1,) * (prior.ndim - 1))
    return out


# ---- Beside the deep model ----------------------------------------------------------------------------------
def headline(config, point: dict) -> str:
    """The metric the console line compares: the run's `best_metric` if the results have it, else macro_auroc."""
    name = str(config.get("best_metric", "macro_auroc"))
    try:
        metric_value(point, name)
        return name
    except (KeyError, TypeError, ValueError):
        return "macro_auroc"


def metric_or_nan(tree: dict | None, path: str) -> float:
    """A metric by dotted path, NaN where the tree lacks it."""
    try:
        return metric_value(tree, path)
    except (KeyError, TypeError, ValueError):
        return float("nan")


def compare_with_baselines(experiment, split: str, step: int, collected, log=print, model_record=None) -> dict:
    """Fits the baselines on the training split of `experiment`'s dataset (settings and the best baseline
    chosen on validation), scores them on `split`, compares the deep model's `collected` predictions of
    that split with the best; writes `W/eval/<split>_baselines.json` and `.npz` and logs the verdict.
    `model_record`: the model's `eval/<split>.json` record of these predictions (its metrics and intervals
    are reused; they are those `records.with_intervals` computes, the same resamples)."""
    from mmjax.evaluation.compare import compare_predictions
    from mmjax.evaluation.records import dump_json, eval_settings, with_intervals

    started = time.perf_counter()
    splits = ["train"] + [s for s in ("validation",) if s in experiment.splits and s != split] + [split]
    builder, spec, tasks = experiment.builder, experiment.spec, experiment.tasks
    splits = list(dict.fromkeys(splits))
    most = int((experiment.config.get("eval", None) or {}).get("ecg_intervals_max_rows", ECG_INTERVALS_MAX_ROWS))
    # a label-efficiency run (data.label_fraction) fits the baselines on the same training rows as the model
    rows = {s: experiment.train_rows if s == "train" else None for s in splits}
    intervals = sum(len(pipeline.CheckedSource(builder, s, rows[s])) for s in splits) <= most
    data = {s: read_split(builder, spec, experiment.modalities, tasks, s, intervals, rows[s]) for s in splits}
    preds, labels, masks, ids = collected
    here = data[split]
    if len(here.ids) != len(ids) or np.any(here.ids != np.asarray(ids).astype(str)):
        raise ValueError(f"the baselines read other rows of {split!r} than the model scored ({len(here.ids)} vs "
                         f"{len(ids)}): the prepared dataset changed under the run?")
    fitted, details = fit_predict(data, spec, experiment.modalities, tasks)
    settings = eval_settings(experiment.config)
    metric = headline(experiment.config, task_metrics.compute_metrics(preds, labels, masks, tasks))
    # without a validation split the best is not chosen on the rows it is compared on: a fixed rule
    chooser = "validation" if "validation" in data else None
    table = {}
    for name, by_split in fitted.items():
        row = {**details[name], split: with_intervals((by_split[split], labels, masks, ids), tasks, settings)}
        if chooser and chooser != split:
            row[chooser] = {"metrics": task_metrics.compute_metrics(by_split[chooser], data[chooser].labels,
                                                                    data[chooser].masks, tasks)}
        table[name] = row
    best, chooser = choose_best(table, chooser, metric)
    model = ({k: model_record[k] for k in ("metrics", "ci") if k in model_record} if model_record is not None
             else with_intervals(collected, tasks, settings))
    paired = compare_predictions(preds, fitted[best][split], labels, masks, ids, tasks, settings["resamples"],
                                 settings["seed"], settings["level"])
    out = {"format": FORMAT, "step": int(step), "split": split, "metric": metric, "best": best, "chosen_on": chooser,
           "rows": {s: int(len(d.ids)) for s, d in data.items()}, "ecg_intervals": intervals, "model": model,
           "baselines": table,
           "comparison": paired, "resamples": settings["resamples"], "seconds": round(time.perf_counter() - started, 1)}
    out["verdict"] = verdict(out)
    folder = os.path.join(experiment.workdir, EVAL_DIR)
    os.makedirs(folder, exist_ok=True)
    dump_json(out, os.path.join(folder, f"{split}_baselines.json"))
    np.savez_compressed(os.path.join(folder, f"{split}_baselines.npz"), patient_id=np.asarray(ids, str),
                        **{f"pred/{n}/{t}": v for n, by_split in fitted.items() for t, v in by_split[split].items()})
    log(out["verdict"])
    return out


def compare_or_warn(experiment, split: str, step: int, collected, model_record=None) -> dict | None:
    """`compare_with_baselines` (quietly), or None with a warning on the console when it fails: the run's
    and the evaluation's other results must never be lost to the baselines (training and `--mode=evaluate`)."""
    try:
        return compare_with_baselines(experiment, split, step, collected, log=lambda _: None,
                                      model_record=model_record)
    except Exception as e:  # noqa: BLE001
        print(f"Warning: the classical baselines failed ({type(e).__name__}: {e}); everything else is kept "
              f"(--config.eval.baselines=False, or --baselines=false in evaluate and report, skips them)", flush=True)
        return None


def cell(rec: dict, metric: str, digits: int = 3) -> str:
    """'0.620 [0.550, 0.690]': a record's metric and its interval (if it has one)."""
    text = f"{metric_or_nan(rec['metrics'], metric):.{digits}f}"
    if "ci" in rec:
        low, high = (metric_or_nan(rec["ci"], f"{metric}.{end}") for end in ("low", "high"))
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def choose_best(table: dict, chooser: str | None, metric: str) -> tuple[str, str]:
    """(the best baseline, what chose it): the best `metric` on split `chooser` (validation), or, with no
    validation metric, a fixed rule (never the evaluated rows): the late fusion, else the first model."""
    lower = lower_is_better(metric)
    scored = {n: metric_or_nan(r[chooser]["metrics"], metric) if chooser else float("nan") for n, r in table.items()}
    ranked = sorted((n for n in scored if np.isfinite(scored[n])), key=lambda n: scored[n], reverse=not lower)
    if ranked:
        return ranked[0], chooser
    best = LATE_FUSION if LATE_FUSION in table else next((n for n in table if n not in TRIVIAL), next(iter(table)))
    return best, "a fixed rule (no validation metric)"


def verdict(out: dict) -> str:
    """'test macro_auroc: mmjax 0.620 [0.550, 0.690] vs best baseline (text: ..., chosen on validation) 0.880
    [0.840, 0.920]: the baseline is better, p <= 0.001' from a `compare_with_baselines` record."""
    metric, best, split = out["metric"], out["best"], out["split"]
    ab = out["comparison"]["metrics"].get(metric, {})
    head = (f"{split} {metric}: mmjax {cell(out['model'], metric)} vs best baseline ({best}, chosen on "
            f"{out['chosen_on']}) {cell(out['baselines'][best][split], metric)}")
    p = ab.get("p_value", float("nan"))
    if not np.isfinite(p):
        return head + ": no paired test (no intervals)"
    better_model = (ab["difference"] < 0) if lower_is_better(metric) else (ab["difference"] > 0)
    floor = 1.0 / (ab.get("resamples", out.get("resamples", 0)) + 1)  # the smallest: no resample reversed the order
    stated = f"p <= {p:.3f}" if p <= floor * (1 + 1e-9) else f"p = {p:.3f}"
    if p >= 0.05:
        return head + f": no significant difference, {stated} (paired bootstrap over patients)"
    return head + (": mmjax is better, " if better_model else ": the baseline is better, ") + stated + \
        " (paired bootstrap over patients)"


def format_table(out: dict) -> str:
    """A fixed-width table: every baseline's metric on the split it was chosen on, and on the evaluated
    split with its interval."""
    metric, split, chooser = out["metric"], out["split"], out["chosen_on"]
    shown = chooser != split and any(chooser in rec for rec in out["baselines"].values())
    rows = [("model", f"{chooser} {metric}" if shown else "", f"{split} {metric} [interval]")]
    rows.append(("mmjax", "", cell(out["model"], metric, 4)))
    for name, rec in out["baselines"].items():
        chosen_on = f"{metric_or_nan(rec[chooser]['metrics'], metric):.4f}" if shown and chooser in rec else ""
        rows.append((name + (" (best)" if name == out["best"] else ""), chosen_on, cell(rec[split], metric, 4)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
