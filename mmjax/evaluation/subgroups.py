"""Who the model fails: every metric with its interval per subgroup of patients, the gap between the
best and the worst group with a permutation test of whether it is larger than chance, and per-group
calibration; the same over the subsets of modalities a patient has.

Group variables of a split's rows (`attributes`):
- `sex`, `age` (in bands, `eval.age_bands`, default edges 40, 60, 80: `<40`, `40-59`, `60-79`, `>=80`)
  and `site`: from the records' `female`/`age` fields (`synthetic_patients`), or from the manifest's
  columns named `sex`/`gender`, `age`, `site`/`hospital`/`center`/`centre`/`database` (case ignored);
- any other manifest column named in `eval.groups` (or `--groups=` of `--mode=evaluate`), as its values;
- `modalities`: the modalities a row has (`image+text`, ...): real missingness is not random.
An empty cell is its own group, `missing`.

Per group with at least `eval.min_group_patients` patients (default 10; smaller groups are listed
with their counts): the metrics of its rows with patient-level bootstrap intervals (`records.with_intervals`,
the same resamples and level as the split's), and per binary output (or multiclass task) the
predicted against the observed rate, ECE and Brier score of the probabilities as the model gives them.

The gap of a headline metric (`macro_auroc`, each task's AUROC, balanced accuracy or MAE) is the best
group's value minus the worst's. Its p-value asks whether the groups differ more than they would if
group membership had nothing to do with the model's errors: the patients' group labels are permuted
`eval.group_permutations` times (default 1000; group sizes kept), and p = (1 + #{permuted gap >= observed})
/ (1 + permutations). A permutation is applied as 0/1 row weights, so each permuted group's metric is
exactly the metric of its rows and all permutations are computed at once (`compute_metrics`' [R, N]
weights), as the bootstrap is. Rows of groups too small to report stay out of the test.

Written to `W/eval/<split>_subgroups.json` by `--mode=evaluate`; the report draws it.
"""

from __future__ import annotations

import os

import numpy as np

from mmjax.config import lower_is_better, parse_list
from mmjax.console import ConfigError
from mmjax.data.pipeline import CheckedSource
from mmjax.evaluation import records
from mmjax.metrics import bootstrap, calibration
from mmjax.metrics import tasks as task_metrics

FORMAT = 1
AGE_BANDS = (40, 60, 80)
MIN_PATIENTS = 10
PERMUTATIONS = 1000
MISSING = "missing"
# Manifest columns read as the standard group variables (lower-cased names).
KNOWN_COLUMNS = {"sex": ("sex", "gender"), "age": ("age",), "site": ("site", "hospital", "center", "centre",
                                                                     "database")}


def settings(config, groups=()) -> dict:
    """The subgroup analysis's settings from `config.eval` (and `groups`, extra columns asked for)."""
    e = config.get("eval", None) or {}
    extra = [*parse_list(e.get("groups", "") or ""), *groups]
    bands = e.get("age_bands", None)
    bands = AGE_BANDS if bands is None else tuple(float(b) for b in parse_list(bands))
    if not bands or list(bands) != sorted(set(bands)):
        raise ConfigError(f"eval.age_bands={e.get('age_bands')!r}: give increasing ages, e.g. '40,60,80'")
    return {"groups": list(dict.fromkeys(extra)), "age_bands": bands,
            "min_patients": int(e.get("min_group_patients", MIN_PATIENTS)),
            "permutations": int(e.get("group_permutations", PERMUTATIONS)), **records.eval_settings(config)}


def age_band(age, edges=AGE_BANDS) -> str:
    """`<40`, `40-59`, `60-79`, `>=80` for edges (40, 60, 80); `missing` for NaN or an empty cell."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return MISSING
    if not np.isfinite(a):
        return MISSING
    name = lambda x: f"{x:g}"
    if a < edges[0]:
        return f"<{name(edges[0])}"
    for low, high in zip(edges, edges[1:]):
        if a < high:
            return f"{name(low)}-{name(high - 1) if float(high).is_integer() else name(high)}"
    return f">={name(edges[-1])}"


def attributes(experiment, split: str, options: dict) -> tuple[np.ndarray, dict]:
    """(patient ids, {variable: [N] group names}) of every record of `split`, in the split's order."""
    source = CheckedSource(experiment.builder, split)
    keep = ("patient_id", "present", "row", "female", "age")  # not the images and signals: memory
    recs = [{k: r[k] for k in keep if k in r} for r in (source[i] for i in range(len(source)))]
    ids = np.array([text(r["patient_id"]) for r in recs])
    names = [m for m in experiment.modalities if all(m in r["present"] for r in recs)]  # the run's modalities
    out = {"modalities": np.array(["+".join(m for m in names if bool(r["present"][m])) or "none" for r in recs])}
    table = _manifest_table(experiment)
    if table is not None:
        rows = [int(r["row"]) - 1 for r in recs]
        lower = {c.lower(): c for c in table.columns}
        for variable, candidates in KNOWN_COLUMNS.items():
            column = next((lower[c] for c in candidates if c in lower), None)
            if column is not None and column not in options["groups"]:
                out[variable] = _cells(table[column].iloc[rows], options if variable == "age" else None)
        for column in options["groups"]:
            if column not in table.columns:
                raise ConfigError(f"eval.groups: the manifest has no column {column!r} (it has "
                                  f"{', '.join(map(str, table.columns))})")
            out[column] = _cells(table[column].iloc[rows], None)
    else:
        if recs and "female" in recs[0]:
            out["sex"] = np.array(["female" if bool(r["female"]) else "male" for r in recs])
        if recs and "age" in recs[0]:
            out["age"] = np.array([age_band(r["age"], options["age_bands"]) for r in recs])
        if options["groups"]:
            raise ConfigError(f"eval.groups={','.join(options['groups'])}: named columns are read from a "
                              f"manifest; {experiment.builder.name} has none")
    return ids, out


def text(x) -> str:
    """A record's string field (TFDS gives bytes) as str."""
    return x.decode() if isinstance(x, bytes) else str(x)


def _cells(column, options) -> np.ndarray:
    values = [str(v).strip() for v in column.tolist()]
    if options is not None:
        return np.array([age_band(v if v else None, options["age_bands"]) for v in values])
    return np.array([v if v else MISSING for v in values])


def _manifest_table(experiment):
    manifest = getattr(getattr(experiment.builder, "builder_config", None), "manifest", None)
    if not manifest:
        return None
    from mmjax.data.manifest.table import read_table

    return read_table(manifest)


def headline(tasks) -> list[str]:
    """The metrics whose gap between groups is tested (dotted paths into `compute_metrics`)."""
    out = []
    for t in tasks:
        out += {"binary": [f"{t.name}.auroc"], "multilabel": [f"{t.name}.macro_auroc"],
                "multiclass": [f"{t.name}.macro_auroc", f"{t.name}.balanced_accuracy"],
                "regression": [f"{t.name}.mae"]}[t.kind]
    classification = [t for t in tasks if t.kind != "regression"]
    return (["macro_auroc"] if len(classification) > 1 else []) + out


def _get(tree, path: str):
    for k in path.split("."):
        tree = tree[k]
    return tree


def _order(group: str) -> tuple:
    """Groups in a readable order: age bands by age, names alphabetically, `missing` last."""
    import re

    band = re.fullmatch(r"(<|>=)?(-?[0-9.]+)(-[0-9.]+)?", group)
    if band:
        return (1, float("-inf") if band.group(1) == "<" else float(band.group(2)), group)
    return (3 if group == MISSING else 2, 0.0, group)


def subset(collected, rows: np.ndarray) -> tuple:
    preds, labels, masks, ids = collected
    take = lambda d: {k: v[rows] for k, v in d.items()}
    return take(preds), take(labels), take(masks), ids[rows]


def group_calibration(collected, tasks, bins: int = 10) -> dict:
    """{output: {'predicted', 'observed', 'ece', 'brier', 'count'}} of the raw probabilities: each binary
    output's mean prediction against its positive rate, each multiclass task's top-label confidence
    against its accuracy."""
    preds, labels, masks, _ = collected
    out = {}
    for name, _task, y, p in calibration.binary_outputs(preds, labels, masks, tasks):
        out[name] = {"predicted": float(np.mean(p)) if len(p) else float("nan"),
                     "observed": float(np.mean(y)) if len(y) else float("nan"),
                     "ece": calibration.ece(y, p, bins) if len(y) else float("nan"),
                     "brier": calibration.brier(y, p) if len(y) else float("nan"), "count": int(len(y))}
    for t in tasks:
        if t.kind == "multiclass":
            known = masks[t.name]
            y, p = labels[t.name][known].astype(int), preds[t.name][known]
            if not len(y):
                continue
            mc = calibration.multiclass_calibration(y, p, bins)
            out[t.name] = {"predicted": float(p.max(-1).mean()), "observed": float(np.mean(p.argmax(-1) == y)),
                           "ece": mc["ece"], "brier": mc["brier"], "count": int(len(y))}
    return out


def permutation_gaps(collected, tasks, groups: np.ndarray, names: list, metrics: list[str], permutations: int,
                     seed: int = 0, chunk: int = 0) -> dict:
    """{metric: [R] gap (max - min over `names`)} with the patients' groups permuted R times (a patient's
    group: its first row's). `groups` [N]: each row's group; rows in no group of `names` stay out."""
    preds, labels, masks, ids = collected
    first, inverse = bootstrap.first_rows(ids)
    patient_group = groups[first]
    pool = np.flatnonzero(np.isin(patient_group, names))  # the patients that take part
    chunk = chunk or max(1, min(permutations, (8 << 20) // max(len(inverse), 1)))
    rng = np.random.default_rng(seed)
    gaps = {m: [] for m in metrics}
    for start in range(0, permutations, chunk):
        r = min(chunk, permutations - start)
        shuffled = np.tile(patient_group, (r, 1))
        shuffled[:, pool] = patient_group[pool][np.argsort(rng.random((r, len(pool))), axis=1)]
        per_row = shuffled[:, inverse]  # [r, N]
        values = {m: [] for m in metrics}
        for g in names:
            tree = task_metrics.compute_metrics(preds, labels, masks, tasks, sample_weight=(per_row == g) * 1.0)
            for m in metrics:
                values[m].append(np.asarray(_get(tree, m), np.float64))
        for m in metrics:
            stacked = np.stack(values[m], -1)  # [r, groups]
            with np.errstate(all="ignore"):
                gap = np.nanmax(stacked, -1) - np.nanmin(stacked, -1)
            gap[np.isnan(stacked).sum(-1) > len(names) - 2] = np.nan  # fewer than two groups defined
            gaps[m].append(gap)
    return {m: np.concatenate(v) for m, v in gaps.items()}


def analyze_variable(collected, tasks, groups: np.ndarray, options: dict) -> dict:
    """One group variable: {'groups': {name: {...}}, 'too_small': {name: patients}, 'gaps': {metric: ...},
    'moved_rows'}. A patient belongs to the group of its first row (the unit the permutation test
    permutes): rows of a patient in another group than its first row's (e.g. a later visit in another
    age band) are counted in `moved_rows` and evaluated with the first row's group."""
    ids = collected[3]
    first, inverse = bootstrap.first_rows(ids)
    given, groups = groups, groups[first][inverse]
    out, small = {}, {}
    for g in sorted(set(groups.tolist()), key=_order):
        rows = groups == g
        patients = int(len(np.unique(ids[rows])))
        if patients < options["min_patients"]:
            small[g] = patients
            continue
        sub = subset(collected, rows)
        out[g] = {"patients": patients, "rows": int(rows.sum()), **records.with_intervals(sub, tasks, options),
                  "calibration": group_calibration(sub, tasks, options["bins"])}
    result = {"groups": out, "too_small": small, "gaps": {}, "moved_rows": int(np.sum(given != groups))}
    names = list(out)
    if len(names) < 2:
        return result
    metrics = [m for m in headline(tasks) if sum(np.isfinite(_get(out[g]["metrics"], m)) for g in names) >= 2]
    permuted = permutation_gaps(collected, tasks, groups, names, metrics, options["permutations"],
                                options["seed"]) if options["permutations"] > 0 else {}
    for m in metrics:
        values = {g: float(_get(out[g]["metrics"], m)) for g in names if np.isfinite(_get(out[g]["metrics"], m))}
        order = sorted(values, key=values.get, reverse=not lower_is_better(m))
        best, worst = order[0], order[-1]
        gap = {"best": best, "worst": worst, "best_value": values[best], "worst_value": values[worst],
               "gap": abs(values[best] - values[worst])}
        if m in permuted:
            d = permuted[m][np.isfinite(permuted[m])]
            gap.update(permutations=int(len(d)),
                       p_value=float((1 + np.sum(d >= gap["gap"] - 1e-12)) / (1 + len(d))) if len(d) else float("nan"))
        result["gaps"][m] = gap
    return result


def analyze(collected, tasks, variables: dict, options: dict) -> dict:
    """Every group variable of `variables` ({name: [N] group names, aligned with `collected`'s rows})."""
    out = {"format": FORMAT, "min_patients": options["min_patients"], "permutations": options["permutations"],
           "age_bands": list(options["age_bands"]), "variables": {}}
    for name, groups in variables.items():
        if name == "modalities" and len(set(groups.tolist())) == 1:
            continue  # every row has the same modalities: nothing to compare
        out["variables"][name] = analyze_variable(collected, tasks, np.asarray(groups), options)
    return out


def align(collected_ids, ids: np.ndarray, variables: dict) -> dict:
    """The variables of the records (`ids` in the split's order) in the order of the evaluated rows: the
    same rows when the ids agree position by position, else each patient's first record's values."""
    collected_ids = np.asarray([str(i) for i in collected_ids])
    if len(collected_ids) == len(ids) and np.array_equal(collected_ids, ids):
        return variables
    first = {}
    for k, i in enumerate(ids):
        first.setdefault(i, k)
    missing = sorted(set(collected_ids) - set(first))
    if missing:
        raise ValueError(f"{len(missing)} evaluated patients are not among the split's records (e.g. {missing[0]})")
    at = np.array([first[i] for i in collected_ids])
    return {k: v[at] for k, v in variables.items()}


def resolved(options: dict) -> dict:
    """What of the settings a stored analysis must match to be reused."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in options.items()}


def evaluate(experiment, split: str, step: int, collected, groups=()) -> dict:
    """Writes `eval/<split>_subgroups.json`; returns what it wrote."""
    options = settings(experiment.config, groups)
    ids, variables = attributes(experiment, split, options)
    result = {"step": int(step), "split": split, "options": resolved(options),
              **analyze(collected, experiment.tasks, align(collected[3], ids, variables), options)}
    folder = os.path.join(experiment.workdir, records.EVAL_DIR)
    os.makedirs(folder, exist_ok=True)
    records.dump_json(result, os.path.join(folder, f"{split}_subgroups.json"))
    return result


def shown(var: dict, metric: str = "macro_auroc") -> str:
    """The metric a variable is shown by: `metric` if its gap was tested, else the first tested one."""
    return metric if metric in var["gaps"] or not var["gaps"] else next(iter(var["gaps"]))


def value_and_interval(group: dict, metric: str) -> tuple[float, float, float]:
    """(value, low, high) of `metric` in one group's results (NaN bounds without intervals)."""
    try:
        ci = _get(group.get("ci", {}), metric)
        low, high = ci["low"], ci["high"]
    except (KeyError, TypeError):
        low = high = float("nan")
    return float(_get(group["metrics"], metric)), float(low), float(high)


def format_table(result: dict, metric: str = "macro_auroc") -> str:
    """Each variable's groups with `metric` (the first headline metric when absent) and interval, and the gap."""
    lines = []
    for name, var in result["variables"].items():
        groups = var["groups"]
        if not groups:
            continue
        m = shown(var, metric)
        cells = []
        for g, r in groups.items():
            value, low, high = value_and_interval(r, m)
            ci = f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) else ""
            cells.append(f"{g} {value:.3f}{ci} (n={r['patients']})")
        gap = var["gaps"].get(m)
        tail = f"; gap {gap['gap']:.3f}, p={gap.get('p_value', float('nan')):.3g}" if gap else ""
        small = f"; too few: {', '.join(f'{g} ({n})' for g, n in var['too_small'].items())}" if var["too_small"] else ""
        lines.append(f"  {name} ({m}): " + " | ".join(cells) + tail + small)
    return "\n".join(lines)
