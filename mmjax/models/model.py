"""The multimodal diagnosis model: encoders -> (modality dropout) -> fusion -> task heads.

    outputs, aux = model.apply({'params': params}, batch, train=False)
    outputs, aux = model.apply({'params': params}, batch, train=True, rngs={'dropout': key})

`outputs[task]` are logits (multilabel and multiclass `[B, K]`, binary `[B]`) or predictions in the
target's units (regression `[B]`: `target_mean + target_std * z`, see `TaskSpec`).
`aux` holds `embeddings` (pooled per modality, `[B, D]`), `attention` (cross-attention weights,
when the fusion has them), `present` (each modality's presence after modality dropout) and,
with uncertainty weighting, `task_log_vars` `[num_tasks]` for the loss. With `modality_heads`,
`modality_outputs[task]` `[B, M, ...]` are each encoder's own predictions (its pooled tokens
through its own heads) and `modality_present` `[B, M]` says which exist: the loss adds them as
an auxiliary term, so every encoder learns as if alone and no modality is left under-trained
because another one is easier (the fusion model otherwise trails single-modality models on
what only the image or only the ECG shows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.batch import TaskSpec
from mmjax.models.encoders import ENCODERS
from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import pool
from mmjax.models.layers import Dtype

REMAT_PARTS = ("encoders", "fusion")


def _call_fusion(fusion, names, tokens, masks, train):
    """fusion({name: tokens}, {name: mask}, train=train) from tuples in the model's modality order."""
    return fusion(dict(zip(names, tokens)), dict(zip(names, masks)), train=train)


# The fusion rematerialized: its inputs cross the boundary as tuples, because a dict passed through a JAX
# transformation comes back with its keys sorted, and a fusion reads the modalities in the model's order.
# `names` and `train` (a Python bool that picks code paths) stay static; argument 0 is the module.
_remat_fusion = nn.remat(_call_fusion, static_argnums=(1, 4))


def encoder_class(settings: Mapping) -> tuple[type, dict]:
    """(the registered encoder class, its keyword arguments) of one modality's settings (`encoders[m]`:
    kwargs plus `name`)."""
    kwargs = dict(settings)
    return ENCODERS.get(kwargs.pop("name")), kwargs


def drop_modalities(present: dict, rate: float, rng) -> dict:
    """Drops each present modality with probability `rate`, never all of a patient's modalities."""
    names = list(present)
    p = jnp.stack([present[m] for m in names], axis=1)  # [B, M]
    k_drop, k_pick = jax.random.split(rng)
    keep = p & (jax.random.uniform(k_drop, p.shape) >= rate)
    # A patient who would lose everything keeps one of its modalities, chosen at random.
    pick = jnp.argmax(jnp.where(p, jax.random.uniform(k_pick, p.shape), -1.0), axis=1)
    one = (jnp.arange(len(names))[None, :] == pick[:, None]) & p
    keep = jnp.where(jnp.any(keep, axis=1, keepdims=True), keep, one)
    return {m: keep[:, i] for i, m in enumerate(names)}


class TaskHeads(nn.Module):
    """One linear head per task over fused [B, K, D]; logits averaged over fused_mask [B, K] (bool, or
    float weights such as a decision fusion's `fused_weights`; renormalized to sum to 1)."""

    tasks: Sequence[TaskSpec]
    dtype: Dtype = jnp.float32
    average: bool = True  # False: per-K outputs [B, K, ...] (the per-modality auxiliary heads)

    @nn.compact
    def __call__(self, fused, fused_mask):
        k, d = fused.shape[1:]
        w = fused_mask.astype(jnp.float32)
        w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
        outputs = {}
        for t in self.tasks:
            kernel = self.param(f"{t.name}_kernel", nn.initializers.normal(0.02), (k, d, t.num_outputs), jnp.float32)
            bias = self.param(f"{t.name}_bias", nn.initializers.zeros, (k, t.num_outputs), jnp.float32)
            logits = jnp.einsum("bkd,kdo->bko", fused.astype(jnp.float32), kernel) + bias
            if self.average:
                logits = jnp.einsum("bko,bk->bo", logits, w)
            if t.kind == "regression":  # the head predicts the standardized target
                logits = t.target_mean + t.target_std * logits
            outputs[t.name] = logits if t.kind in ("multilabel", "multiclass") else logits[..., 0]
        return outputs


class MultimodalModel(nn.Module):
    """`modalities` are batch keys; `encoders[m]` the kwargs of modality m's encoder plus `name`, the
    registered encoder (`mmjax.models.build.build_model` fills both from the dataset's spec)."""

    modalities: Sequence[str]
    tasks: Sequence[TaskSpec]
    encoders: Mapping[str, Mapping]  # modality -> encoder kwargs (plus 'name' of a registered encoder)
    fusion: str = "cross_attention"
    fusion_kwargs: Mapping = None
    width: int = 128
    modality_dropout: float = 0.0
    modality_heads: bool = False  # auxiliary heads on each encoder's pooled output (see losses)
    uncertainty_weighting: bool = False
    dtype: Dtype = jnp.float32
    # 'encoders' and/or 'fusion': those modules are rematerialized (`nn.remat`): the backward pass
    # recomputes their activations from their inputs instead of keeping them, for memory
    remat: Sequence[str] = ()

    @nn.compact
    def __call__(self, batch, train: bool = False):
        present = {m: batch[m]["present"] for m in self.modalities}
        if train and self.modality_dropout > 0:
            present = drop_modalities(present, self.modality_dropout, self.make_rng("dropout"))
        unknown = set(self.remat) - set(REMAT_PARTS)
        if unknown:
            raise ValueError(f"model.remat: unknown parts {sorted(unknown)}; choose from {list(REMAT_PARTS)}")
        tokens, masks = {}, {}
        for m in self.modalities:
            cls, kwargs = encoder_class(self.encoders[m])
            inputs = dict(batch[m], present=present[m])
            remat = "encoders" in self.remat
            if remat:  # __call__(self, inputs, train): `train` positional and static
                cls = nn.remat(cls, static_argnums=(2,))
            encoder = cls(width=self.width, dtype=self.dtype, name=f"{m}_encoder", **kwargs)
            tokens[m], masks[m] = encoder(inputs, train) if remat else encoder(inputs, train=train)
        fusion = FUSIONS.get(self.fusion)(width=self.width, dtype=self.dtype, name="fusion",
                                          **dict(self.fusion_kwargs or {}))
        call = _remat_fusion if "fusion" in self.remat else _call_fusion
        names = tuple(self.modalities)
        fused, fused_mask, aux = call(fusion, names, tuple(tokens[m] for m in names), tuple(masks[m] for m in names),
                                      train)
        outputs = TaskHeads(tuple(self.tasks), name="heads")(fused, aux.get("fused_weights", fused_mask))
        aux = dict(aux, present=present)
        if self.modality_heads:
            pooled, has = pool(tokens, masks)  # [B, M, D], [B, M] in the order of self.modalities
            aux["modality_outputs"] = TaskHeads(tuple(self.tasks), average=False, name="modality_heads")(pooled, has)
            aux["modality_present"] = has
        if self.uncertainty_weighting:
            aux["task_log_vars"] = self.param("task_log_vars", nn.initializers.zeros, (len(self.tasks),), jnp.float32)
        return outputs, aux
