"""Small helpers for reading an experiment's config (the bottom layer: imports nothing of mmjax).

Config values that hold lists or mappings come as text from the command line
(`--config.modalities=image+text`, `--config.loss.weights=dx=1,los=0.2`); these read them the same
way everywhere. `metric_value` and `lower_is_better` read the metric names of `best_metric` and the
sweep's `sweep.metric`.
"""

from __future__ import annotations

# Settings no result depends on: a sweep (`mmjax/training/sweep.py`) reads back a finished run whatever
# its value of them.
NO_RESULT_DEPENDS = frozenset({"train.figures"})


def parse_list(value: str, known=None, what="value") -> tuple[str, ...]:
    """'a,b' or 'a+b' -> ('a', 'b'); with `known`, an unknown item is an error naming it."""
    items = tuple(v for v in value.replace("+", ",").split(",") if v) if value else ()
    if known is not None:
        unknown = [v for v in items if v not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; choose from {list(known)}")
    return items


def parse_mapping(value, what: str) -> dict:
    """A config dict, or 'a=1,b=0.5' text from the command line -> {name: value}."""
    if not isinstance(value, str):
        return dict(value or {})
    out = {}
    for item in value.split(","):
        if item.strip():
            key, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"{what}: expected name=value, got {item!r}")
            out[key.strip()] = v.strip()
    return out


def metric_value(results: dict, name: str) -> float:
    """A metric by dotted path: 'macro_auroc', 'answer.accuracy', 'findings.macro_auroc'."""
    value = results
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"best_metric={name!r}: no {key!r} in the evaluation results; "
                           f"top level has {sorted(results)}")
        value = value[key]
    return float(value)


def lower_is_better(metric: str) -> bool:
    """Errors and losses (mae, rmse, ..._loss) are minimized; every other metric maximized."""
    last = metric.rsplit(".", 1)[-1]
    return last in ("mae", "rmse", "brier", "ece") or last.endswith("loss")
