"""Integrated gradients over all modalities of a small model: completeness, absent modalities get
nothing, and the text path goes through the embeddings (both text encoders)."""

import jax
import numpy as np
import pytest

from mmjax.batch import ModalitySpec, TaskSpec, fake_batch
from mmjax.evaluation import attribution
from mmjax.models.build import build_model, encoder_config, fusion_config

MODS = (ModalitySpec("xray", "image", shape=(16, 16, 1), mean=[0.0], std=[1.0]),
        ModalitySpec("note", "text", vocab=tuple(f"w{i}" for i in range(40))),
        ModalitySpec("labs", "tabular", numeric=("a", "b", "c")),
        ModalitySpec("ecg", "signal", shape=(60, 2), rate=30.0))
TASKS = (TaskSpec("dx", "multilabel", ("p", "q")), TaskSpec("sev", "regression", target_mean=0.0, target_std=1.0))


def _model(text_encoder="text", fusion="cross_attention"):
    m = dict(width=16, dtype="float32", num_heads=2, mlp_ratio=2, dropout=0.0, modality_dropout=0.0,
             fusion=fusion_config(fusion, depth=1), image=encoder_config("image", patch_size=8, depth=1),
             text=encoder_config("text", text_encoder, depth=1), tabular=encoder_config("tabular", depth=1),
             signal=encoder_config("signal", patch_size=10, depth=1), per_modality="")
    return build_model(m, MODS, TASKS)


@pytest.mark.parametrize("text_encoder,fusion", [("text", "cross_attention"), ("rnn", "concat")])
def test_integrated_gradients_are_complete_and_absent_modalities_get_nothing(text_encoder, fusion):
    model = _model(text_encoder, fusion)
    batch = fake_batch(MODS, TASKS, 4, text_length=12, seed=1)
    batch["note"]["mask"][0, 8:] = False  # padding
    batch["ecg"]["present"][2] = False  # an absent modality
    batch = {k: v for k, v in batch.items() if k != "patient_id"}
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    kinds = {m.name: m.kind for m in MODS}
    f = attribution.output_fn(model, TASKS, "dx", 1)
    a = attribution.integrated_gradients(model, params, batch, f, kinds, steps=64)
    assert a["xray"].shape == (4, 16, 16, 1) and a["note"].shape == (4, 12) and a["labs"].shape == (4, 3)
    assert a["ecg"].shape == (4, 60, 2)
    gap = attribution.completeness_gap(a)
    change = np.abs(a["_f_input"] - a["_f_baseline"])
    assert change.max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(gap, 0, atol=0.01 * change.max() + 1e-5)
    assert np.all(a["ecg"][2] == 0)  # absent: its content never enters
    np.testing.assert_array_equal(a["note"][0, 8:], 0)  # padding tokens
    for m in ("xray", "note", "labs"):
        assert np.abs(a[m]).sum() > 0, m
    assert attribution.heatmap(a["xray"], "image").shape == (4, 16, 16)
    assert attribution.heatmap(a["ecg"], "signal").shape == (4, 60)
