"""The model from a config and a dataset's declared modalities and tasks: no data preparation needed.

    model = build_model(config.model, spec.select_modalities(names), tasks)

Each modality's encoder is chosen by its kind (`config.model.<kind>`, whose optional `encoder`
names a registered encoder; default: the kind's own) with that kind's settings; `per_modality`
(a dict, or its JSON text on the command line) overrides settings for one modality by name:
`--config.model.per_modality='{"lateral": {"patch_size": 8}}'`. What an encoder needs of the data
(vocabulary size, categorical column sizes) comes from the `ModalitySpec`.

`config.model.fusion` (from `fusion_config`) holds `name` and the settings of every registered
fusion, `config.model.<kind>` (from `encoder_config`) `encoder` and the settings of every encoder
of that kind, with their defaults; so `--config.model.fusion.num_bottlenecks=8` works whichever
fusion the config file chose, and the launcher never knows a name. The chosen class gets the
settings it declares (plus the model-wide ones) and the rest are ignored. Both come from
`mmjax.models.settings`, which reads them from the source files so that a config loads without jax.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence

import jax.numpy as jnp

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.config import parse_list
from mmjax.models.encoders import ENCODERS
from mmjax.models.fusion import FUSIONS
from mmjax.models.model import REMAT_PARTS, MultimodalModel
from mmjax.models.settings import FROM_DATA, FROM_MODEL, SHARED, encoder_config, fusion_config


def declared_settings(cls) -> dict:
    """{field: default} a fusion or encoder class declares, less what the model sets."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in FROM_MODEL + FROM_DATA or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _accepted(cls, kw: dict, defaults: dict, what: str) -> dict:
    """The settings `cls` declares; a setting it does not declare but that differs from its default
    (so somebody set it) is ignored with a warning, never silently."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # a config read from JSON has lists
    ignored = sorted(k for k, v in kw.items() if k not in names and k in defaults and v != defaults[k])
    if ignored:
        warnings.warn(f"{what}: {cls.__name__} has no settings {ignored}; they are ignored", stacklevel=3)
    return {k: v for k, v in kw.items() if k in names}


def _as_dict(value) -> dict:
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"model.per_modality is not valid JSON: {e}: {value!r}") from e
    return {k: dict(v) for k, v in dict(value).items()}


def encoder_settings(m, spec: ModalitySpec) -> dict:
    """kwargs (plus `name`) of the encoder of one modality."""
    kw = {k: m[k] for k in SHARED}
    kw.update(dict(m[spec.kind]) if spec.kind in m else {})
    per = _as_dict(m.get("per_modality"))
    kw.update(per.get(spec.name, {}))
    name = kw.pop("encoder", spec.kind)
    if name not in ENCODERS:
        raise ValueError(f"modality {spec.name!r}: unknown encoder {name!r}; registered: {ENCODERS.names()}")
    cls = ENCODERS.get(name)
    if cls.kind != spec.kind:
        raise ValueError(f"modality {spec.name!r} is {spec.kind}; encoder {name!r} encodes {cls.kind}")
    declared = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(per.get(spec.name, {})) - declared - {"encoder"})
    if unknown:
        raise ValueError(f"model.per_modality[{spec.name!r}]: encoder {name!r} has no settings {unknown}")
    if spec.kind == "text":
        kw["vocab_size"] = spec.vocab_size
    if spec.kind == "tabular":
        kw["category_sizes"] = spec.category_sizes
    return {**_accepted(cls, kw, encoder_config(spec.kind, name), f"modality {spec.name!r}"), "name": name}


def build_model(m, modalities: Sequence[ModalitySpec], tasks: Sequence[TaskSpec], *, modality_heads: bool = False,
                uncertainty_weighting: bool = False) -> MultimodalModel:
    """`m`: the model config (width, dtype, num_heads, mlp_ratio, dropout, modality_dropout, fusion,
    per-kind encoder settings, per_modality)."""
    if not modalities:
        raise ValueError("the model needs at least one modality")
    unknown = sorted(set(_as_dict(m.get("per_modality"))) - {s.name for s in modalities})
    if unknown:
        raise ValueError(f"model.per_modality names unknown modalities {unknown}; "
                         f"the model has {[s.name for s in modalities]}")
    fusion = dict(m["fusion"])
    name = fusion.pop("name")
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; registered: {FUSIONS.names()}")
    fusion.update({k: m[k] for k in SHARED})
    fusion = _accepted(FUSIONS.get(name), fusion, fusion_config(name), "model.fusion")
    return MultimodalModel(
        modalities=tuple(s.name for s in modalities), tasks=tuple(tasks),
        encoders={s.name: encoder_settings(m, s) for s in modalities}, fusion=name, fusion_kwargs=fusion,
        width=m["width"], modality_dropout=m["modality_dropout"], modality_heads=modality_heads,
        uncertainty_weighting=uncertainty_weighting, dtype=jnp.dtype(m["dtype"]),
        remat=parse_list(m.get("remat", ""), REMAT_PARTS, "model.remat part"))
