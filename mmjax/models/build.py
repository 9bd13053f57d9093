"""The model from a config and a dataset's declared modalities and tasks: no data preparation needed.

    model = build_model(config.model, spec.select_modalities(names), tasks)

Each modality's encoder is chosen by its kind (`config.model.<kind>`, whose optional `encoder`
names a registered encoder; default: the kind's own) with that kind's settings; `per_modality`
(a dict, or its JSON text on the command line) overrides settings for one modality by name:
`--config.model.per_modality='{"lateral": {"patch_size": 8}}'`. What an encoder needs of the data
(vocabulary size, categorical column sizes) comes from the `ModalitySpec`. The fusion gets every
setting of `config.model.fusion` except `name`, plus the shared ones, whatever its name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax.numpy as jnp

from mmjax.batch import ModalitySpec, TaskSpec
from mmjax.models.encoders import ENCODERS
from mmjax.models.fusion import FUSIONS
from mmjax.models.model import MultimodalModel

_SHARED = ("num_heads", "mlp_ratio", "dropout")  # model-wide settings every encoder and fusion takes


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
    kw = {k: m[k] for k in _SHARED}
    kw.update(dict(m[spec.kind]) if spec.kind in m else {})
    per = _as_dict(m.get("per_modality"))
    kw.update(per.get(spec.name, {}))
    kw["name"] = kw.pop("encoder", spec.kind)
    if kw["name"] not in ENCODERS:
        raise ValueError(f"modality {spec.name!r}: unknown encoder {kw['name']!r}; registered: {ENCODERS.names()}")
    if spec.kind == "text":
        kw["vocab_size"] = spec.vocab_size
    if spec.kind == "tabular":
        kw["category_sizes"] = spec.category_sizes
    return kw


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
    fusion.update({k: m[k] for k in _SHARED})
    return MultimodalModel(
        modalities=tuple(s.name for s in modalities), tasks=tuple(tasks),
        encoders={s.name: encoder_settings(m, s) for s in modalities}, fusion=name, fusion_kwargs=fusion,
        width=m["width"], modality_dropout=m["modality_dropout"], modality_heads=modality_heads,
        uncertainty_weighting=uncertainty_weighting, dtype=jnp.dtype(m["dtype"]))
