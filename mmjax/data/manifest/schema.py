"""The manifest schema (YAML; JSON is valid YAML): which columns hold the id, the split, each
modality and each task. Every key is checked: an unknown key or a missing required one is an error
naming it.

```yaml
name: my_study            # optional; default: the manifest's folder name
id: patient_id            # groups rows: a patient never appears in two splits
split: split              # optional column (train / validation / test); else by hashing the id
on_error: strict          # or skip: bad rows are left out and listed in skipped_rows.csv
modalities:
  cxr:  {kind: image, column: image_path, size: 224, channels: 1, window: [40, 400]}  # PNG, JPG, DICOM
  note: {kind: text, column: findings}          # inline text, or the path of an existing .txt file (file: true:
                                                 # every cell is a path; file: false: none is)
  labs: {kind: tabular, numeric: [wbc, crp, age], categorical: [sex, smoker], log: [crp]}
  ecg:  {kind: signal, column: ecg_path, rate: 100, seconds: 10, channels: 12}  # WAV, NPY, CSV, MAT, WFDB
tasks:
  dx:       {kind: multiclass, column: diagnosis, classes: [a, b, c]}   # classes: else from training
  findings: {kind: multilabel, column: problems, separator: ";", classes: [x, y], other_labels: ignore}
  also:     {kind: multilabel, columns: [x, y]}                          # several 0/1 columns
  dead:     {kind: binary, column: died, positive: "yes"}
  los:      {kind: regression, column: los_days, unknown_values: [-1]}
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import yaml

from mmjax.batch import KINDS, RESERVED, TASK_KINDS
from mmjax.data.spec import DataError

_TOP = {"name", "id", "split", "on_error", "modalities", "tasks"}
_MODALITY_KEYS = {
    "image": {"kind", "column", "size", "channels", "window"},
    "text": {"kind", "column", "file"},
    "tabular": {"kind", "numeric", "categorical", "log"},
    "signal": {"kind", "column", "rate", "seconds", "channels", "variable", "file_rate"},
}
_TASK_KEYS = {
    "binary": {"kind", "column", "positive", "unknown_values"},
    "multiclass": {"kind", "column", "classes", "unknown_values"},
    "multilabel": {"kind", "column", "columns", "separator", "classes", "other_labels", "unknown_values"},
    "regression": {"kind", "column", "unknown_values"},
}


class SchemaError(DataError):
    """A schema that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Schema:
    path: str
    name: str
    id: str
    split: str | None
    on_error: str
    modalities: dict  # name -> settings (with 'kind')
    tasks: dict  # name -> settings (with 'kind')

    def columns(self) -> list[str]:
        """Every manifest column the schema reads."""
        cols = [self.id] + ([self.split] if self.split else [])
        for m in self.modalities.values():
            cols += [m["column"]] if "column" in m else list(m.get("numeric", [])) + list(m.get("categorical", []))
        for t in self.tasks.values():
            cols += list(t["columns"]) if "columns" in t else [t["column"]]
        return list(dict.fromkeys(cols))


LEADS = frozenset({"i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"})


def looks_like_ecg(name: str, channel_names=()) -> bool:
    """Whether a signal modality is an ECG: named so (ecg, ekg), or its channels carry lead names."""
    lowered = name.lower()
    names = [str(c).lower() for c in channel_names or () if isinstance(c, str)]
    return "ecg" in lowered or "ekg" in lowered or bool(names) and all(c in LEADS for c in names)


def ecg_rates_capped(modalities: Mapping, rate: float) -> dict:
    """{modality: its schema rate} of the ECG modalities (`looks_like_ecg`) above `rate` Hz (0: none)."""
    if not rate:
        return {}
    out = {}
    for name, m in modalities.items():
        channels = m.get("channels")
        if m.get("kind") == "signal" and m["rate"] > rate and looks_like_ecg(
                name, channels if isinstance(channels, list) else ()):
            out[name] = m["rate"]
    return out


def cap_ecg_rate(schema: Schema, rate: float) -> tuple[Schema, dict]:
    """(the schema with every ECG modality above `rate` Hz prepared at `rate`, {modality: its rate before}).

    The files keep their own rate (a WFDB or MAT header's, else `file_rate`, else the schema's `rate`,
    which becomes `file_rate`) and are resampled polyphase to `rate` as any other rate is. ECG rhythm
    and morphology classifiers lose nothing at 100 Hz (Strodthoff et al. 2021, PTB-XL: 100 vs 500 Hz),
    and a signal encoder's receptive field in seconds is five times longer than at 500 Hz. `rate` 0:
    the schema as it is."""
    capped = ecg_rates_capped(schema.modalities, rate)
    modalities = {name: {**m, "rate": rate, "file_rate": m.get("file_rate") or m["rate"]} if name in capped else m
                  for name, m in schema.modalities.items()}
    return dataclasses.replace(schema, modalities=modalities), capped


def _sanitize(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    return out or "manifest"


def load_schema(path: str, manifest_path: str, on_error: str | None = None) -> Schema:
    """Reads and checks a schema; `on_error` (strict / skip), when given, overrides the file's."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SchemaError(f"schema {path}: cannot read ({e})") from e
    except yaml.YAMLError as e:
        raise SchemaError(f"schema {path}: not valid YAML ({e})") from e
    where = f"schema {path}"
    if not isinstance(raw, Mapping):
        raise SchemaError(f"{where}: expected a mapping at the top, got {type(raw).__name__}")
    _check_keys(raw, _TOP, where)
    for key in ("id", "modalities", "tasks"):
        if key not in raw:
            raise SchemaError(f"{where}: missing required key {key!r}")
    on_error = on_error or raw.get("on_error", "strict")
    if on_error not in ("strict", "skip"):
        raise SchemaError(f"{where}: on_error={on_error!r}; use strict or skip")
    modalities = {str(k): dict(v or {}) for k, v in dict(raw["modalities"] or {}).items()}
    tasks = {str(k): dict(v or {}) for k, v in dict(raw["tasks"] or {}).items()}
    if not modalities:
        raise SchemaError(f"{where}: 'modalities' is empty")
    for name, m in modalities.items():
        _check_modality(name, m, f"{where}: modality {name!r}")
    for name, t in tasks.items():
        _check_task(name, t, f"{where}: task {name!r}")
    folder = os.path.basename(os.path.dirname(os.path.abspath(manifest_path)))
    return Schema(path=os.path.abspath(path), name=_sanitize(str(raw.get("name") or folder)), id=str(raw["id"]),
                  split=raw.get("split"), on_error=on_error, modalities=modalities, tasks=tasks)


def _check_keys(d: Mapping, allowed: set, where: str) -> None:
    unknown = sorted(set(map(str, d)) - allowed)
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_modality(name: str, m: dict, where: str) -> None:
    kind = m.get("kind")
    if kind not in KINDS:
        raise SchemaError(f"{where}: kind={kind!r}; use one of {list(KINDS)}")
    if name in RESERVED:
        raise SchemaError(f"{where}: the name is reserved ({list(RESERVED)})")
    _check_keys(m, _MODALITY_KEYS[kind], where)
    if kind != "tabular" and "column" not in m:
        raise SchemaError(f"{where}: missing required key 'column'")
    if kind == "image":
        m.setdefault("size", 224)
        m.setdefault("channels", 1)
        if m["channels"] not in (1, 3):
            raise SchemaError(f"{where}: channels={m['channels']!r}; use 1 (grayscale) or 3 (RGB)")
        if not (isinstance(m["size"], int) and 8 <= m["size"] <= 2048):
            raise SchemaError(f"{where}: size={m['size']!r}; use an integer in 8..2048")
    if kind == "text" and m.get("file") not in (None, True, False):
        raise SchemaError(f"{where}: file={m['file']!r}; use true (every cell is a path), false (none is) or leave "
                          f"it out (a cell naming an existing .txt file is a path)")
    if kind == "tabular":
        m["numeric"] = [str(c) for c in m.get("numeric") or []]
        m["categorical"] = [str(c) for c in m.get("categorical") or []]
        m["log"] = [str(c) for c in m.get("log") or []]
        if not m["numeric"] and not m["categorical"]:
            raise SchemaError(f"{where}: needs 'numeric' or 'categorical' columns")
        bad = sorted(set(m["log"]) - set(m["numeric"]))
        if bad:
            raise SchemaError(f"{where}: log columns {bad} are not among its numeric columns")
    if kind == "signal":
        for key in ("rate", "seconds", "channels"):
            if key not in m:
                raise SchemaError(f"{where}: missing required key {key!r}")
        if not (m["rate"] > 0 and m["seconds"] > 0):
            raise SchemaError(f"{where}: rate and seconds must be > 0")
        ch = m["channels"]
        if not (isinstance(ch, int) and ch > 0 or isinstance(ch, list) and ch):
            raise SchemaError(f"{where}: channels={ch!r}; a count, or a list of channel names or indices")


def _check_task(name: str, t: dict, where: str) -> None:
    kind = t.get("kind")
    if kind not in TASK_KINDS:
        raise SchemaError(f"{where}: kind={kind!r}; use one of {list(TASK_KINDS)}")
    _check_keys(t, _TASK_KEYS[kind], where)
    if kind == "multilabel":
        if ("column" in t) == ("columns" in t):
            raise SchemaError(f"{where}: give either 'column' (a separated list) or 'columns' (0/1 columns)")
        if "column" in t and not t.get("classes"):
            raise SchemaError(f"{where}: a multilabel 'column' needs its 'classes'")
        if t.get("other_labels", "error") not in ("error", "ignore"):
            raise SchemaError(f"{where}: other_labels={t['other_labels']!r}; use error or ignore")
    elif "column" not in t:
        raise SchemaError(f"{where}: missing required key 'column'")
    if "classes" in t:
        classes = [str(c) for c in t["classes"]]
        if len(set(classes)) != len(classes):
            raise SchemaError(f"{where}: classes repeat: {classes}")
        t["classes"] = classes
    t["unknown_values"] = [str(v) for v in t.get("unknown_values") or []]
