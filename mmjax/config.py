"""Small helpers for reading an experiment's config (the bottom layer: imports nothing of mmjax).

Config values that hold lists or mappings come as text from the command line
(`--config.modalities=image+text`, `--config.loss.weights=dx=1,los=0.2`); these read them the same
way everywhere. `metric_value` and `lower_is_better` read the metric names of `best_metric` and the
sweep's `sweep.metric`.
"""

from __future__ import annotations

# Settings no result depends on: a sweep (`mmjax/training/sweep.py`) reads back a finished run whatever
# its value of them (the input pipeline's workers and memory give the same batches: tests; the classical
# baselines are written beside the model's results and change none of them).
NO_RESULT_DEPENDS = frozenset({"train.figures", "allow_config_change", "data.worker_count", "data.device_prefetch",
                               "data.cache_mib", "eval.baselines", "eval.ecg_intervals_max_rows", "eval.groups",
                               "eval.age_bands", "eval.min_group_patients", "eval.group_permutations", "pretrain."})

# Settings added to mmjax after configs were saved, with the value that means what the code did before
# them: a saved config without the key compares as having that value.
ADDED_DEFAULTS = {"model.remat": "", "data.label_fraction": 1.0, "data.label_seed": 0,
                  "data.ecg_rate": 0, "recipe": "standard", "privacy.dp": False, "privacy.clip_norm": 1.0,
                  "privacy.noise_multiplier": 1.0, "privacy.target_epsilon": 0.0, "privacy.delta": 0.0,
                  "privacy.sampling": "poisson", "privacy.capacity": 0, "privacy.microbatch": 0,
                  "federated.sites": "", "federated.algorithm": "fedavg", "federated.local_steps": 10,
                  "federated.fraction": 1.0, "federated.mu": 0.01, "federated.label_skew": 0.5,
                  "federated.absent": "auto", "federated.only_site": ""}

# Settings a resumed run may change (how long it trains, what it logs, keeps and reports, where the
# prepared data lies, on how many processes and devices), and prefixes of such groups; any other
# difference from the config that trained the checkpoints stops a resume unless
# `--config.allow_config_change=True`.
RESUME_MAY_CHANGE = NO_RESULT_DEPENDS | frozenset({
    "train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.final_checkpoint", "eval_batch_size", "allow_config_change", "init_from",
    "init_params", "data.data_dir", "data.allowed_roots", "data.prepare_workers", "eval.", "sweep.",
    # how the same computation is laid out: the global batches and the state do not depend on them (remat:
    # recomputed activations, the same to float rounding)
    "distributed", "parallel", "sharding", "model.remat"})


def flatten(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (`sep` joins the keys)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}{sep}", sep) if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(before: dict, now: dict, ignore=frozenset(), new_keys: bool = True) -> list[str]:
    """The dotted keys whose values differ between two configs (as dicts), less those in `ignore`
    (a key, or a prefix ending in '.'); `new_keys=False`: less the keys that `before` lacks (settings
    added to mmjax after it was written, which the command line cannot add)."""
    def kept(key):
        return not any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore)

    a, b = flatten(before), flatten(now)
    a = {**{k: v for k, v in ADDED_DEFAULTS.items() if k in b}, **a}
    for d in (a, b):  # without folds the fold means nothing (its default went from 0 to -1, 'every fold')
        if "data.fold" in d and int(d.get("data.folds", 0) or 0) <= 1:
            d.pop("data.fold")
    keys = set(a) | set(b) if new_keys else set(a)
    return sorted(k for k in keys if kept(k) and a.get(k) != b.get(k))


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
