"""Encoders, fusion and the model: shapes, masks, exact exclusion of missing data, batch independence,
and the shared layers against float64 references."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # a config context manager in newer jax; jax.experimental.enable_x64 in older ones
    from jax.experimental import enable_x64 as _enable_x64

    def enable_x64():
        return _enable_x64()
except ImportError:

    def enable_x64():
        return jax.enable_x64(True)

from mmjax.batch import ModalitySpec, TaskSpec, fake_batch, validate_batch
from mmjax.models import layers
from mmjax.models.build import build_model
from mmjax.models.encoders.signal import SignalEncoder
from mmjax.models.fusion import FUSIONS
from mmjax.models.model import MultimodalModel, drop_modalities
from mmjax.models.registry import Registry
from mmjax.training.step import make_eval_step, predictions

TASKS = (TaskSpec("diagnosis", "multilabel", ("a", "b", "c")), TaskSpec("severity", "regression"),
         TaskSpec("mortality", "binary"))
B = 6
# The model-level tests run on a few fusions; every registered fusion passes tests/test_fusion.py.
MODEL_FUSIONS = ("concat", "cross_attention", "weighted_late")


def make_batch(seed=0, b=B):
    rng = np.random.default_rng(seed)
    text_mask = np.arange(12)[None, :] < rng.integers(3, 12, b)[:, None]
    batch = {
        "image": {"values": rng.normal(size=(b, 16, 16, 1)).astype(np.float32), "present": rng.random(b) < 0.7},
        "text": {"values": rng.integers(1, 50, (b, 12)).astype(np.int32) * text_mask, "mask": text_mask,
                 "present": rng.random(b) < 0.7},
        "tabular": {"values": rng.normal(size=(b, 5)).astype(np.float32), "mask": rng.random((b, 5)) < 0.8,
                    "present": rng.random(b) < 0.7},
        "signal": {"values": rng.normal(size=(b, 40, 1)).astype(np.float32), "mask": np.ones((b, 40), bool),
                   "present": rng.random(b) < 0.7},
    }
    batch["image"]["present"][0] = False  # patient 0 always lacks image and signal
    batch["signal"]["present"][0] = False
    batch["text"]["present"][0] = True
    for m in ("text", "signal"):
        batch[m]["mask"] = batch[m]["mask"] & batch[m]["present"][:, None]
    batch["tabular"]["mask"] &= batch["tabular"]["present"][:, None]
    return batch


def make_model(fusion, tasks=TASKS, **kw):
    enc = {"image": {"name": "image", "patch_size": 8}, "text": {"name": "text", "vocab_size": 50},
           "tabular": {"name": "tabular"}, "signal": {"name": "signal", "patch_size": 10}}
    return MultimodalModel(modalities=("image", "text", "tabular", "signal"), tasks=tasks, encoders=enc,
                           fusion=fusion, width=16, **kw,
                           fusion_kwargs={"depth": 2, "num_heads": 2} if fusion == "cross_attention" else {})


def _init(model, batch):
    return model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, batch)["params"]


@pytest.mark.parametrize("fusion", MODEL_FUSIONS)
def test_outputs_shapes_and_aux(fusion):
    batch = make_batch()
    model = make_model(fusion)
    out, aux = model.apply({"params": _init(model, batch)}, batch)
    assert out["diagnosis"].shape == (B, 3) and out["severity"].shape == (B,) and out["mortality"].shape == (B,)
    assert set(aux["embeddings"]) == {"image", "text", "tabular", "signal"}
    assert all(v.shape == (B, 16) for v in aux["embeddings"].values())
    if fusion == "cross_attention":
        assert len(aux["attention"]) == 2 and aux["attention"][0].shape == (B, 2, 4 + 12 + 5 + 4, 4 + 12 + 5 + 4)
        seg = np.asarray(aux["token_modality"])
        w = np.asarray(aux["attention"][0])[0]  # patient 0: no image (modality 0), no signal (3)
        assert np.all(w[:, :, (seg == 0) | (seg == 3)] == 0)
        assert np.all(w[:, seg == 1][:, :, seg == 1] == 0)  # cross-attention never looks at its own modality


@pytest.mark.parametrize("fusion", MODEL_FUSIONS)
def test_absent_modalities_and_masked_entries_change_no_output(fusion):
    batch = make_batch()
    model = make_model(fusion)
    params = _init(model, batch)
    out, aux = model.apply({"params": params}, batch)
    rng = np.random.default_rng(1)
    other = jax.tree.map(np.copy, batch)
    for m in ("image", "text", "tabular", "signal"):
        absent = ~batch[m]["present"]
        v = other[m]["values"]
        v[absent] = rng.integers(1, 50, v[absent].shape) if m == "text" else rng.normal(size=v[absent].shape) * 100
    other["text"]["values"] = np.where(batch["text"]["mask"], other["text"]["values"], rng.integers(1, 50, (B, 12)))
    other["tabular"]["values"] = np.where(batch["tabular"]["mask"], other["tabular"]["values"], 1e3)
    out2, aux2 = model.apply({"params": params}, other)
    jax.tree.map(np.testing.assert_array_equal, out, out2)
    jax.tree.map(np.testing.assert_array_equal, aux["embeddings"], aux2["embeddings"])
    # ... while changing a present modality does change the outputs.
    other["tabular"]["values"] = np.where(batch["tabular"]["mask"], 5.0, other["tabular"]["values"])
    out3, _ = model.apply({"params": params}, other)
    changed = batch["tabular"]["present"]
    assert not np.allclose(np.asarray(out3["severity"])[changed], np.asarray(out["severity"])[changed])


@pytest.mark.parametrize("fusion", MODEL_FUSIONS)
def test_a_patient_does_not_depend_on_the_rest_of_the_batch(fusion):
    batch = make_batch()
    model = make_model(fusion, modality_dropout=0.0)
    params = _init(model, batch)
    out, _ = model.apply({"params": params}, batch)
    other = make_batch(seed=7)
    mixed = jax.tree.map(lambda a, b: np.concatenate([a[:1], b[1:]]), batch, other)
    out2, _ = model.apply({"params": params}, mixed)
    for k in out:
        np.testing.assert_allclose(np.asarray(out2[k])[0], np.asarray(out[k])[0], rtol=1e-5, atol=1e-6)
    alone, _ = model.apply({"params": params}, jax.tree.map(lambda a: a[:1], batch))
    for k in out:
        np.testing.assert_allclose(np.asarray(alone[k])[0], np.asarray(out[k])[0], rtol=1e-5, atol=1e-6)


def test_modality_heads_see_only_their_own_modality():
    batch = make_batch()
    model = make_model("cross_attention", modality_heads=True)
    params = _init(model, batch)
    _, aux = model.apply({"params": params}, batch)
    assert aux["modality_outputs"]["diagnosis"].shape == (B, 4, 3)
    assert aux["modality_outputs"]["severity"].shape == (B, 4)
    np.testing.assert_array_equal(aux["modality_present"][:, 0], batch["image"]["present"])
    other = jax.tree.map(np.copy, batch)
    other["text"]["values"] = np.where(batch["text"]["mask"], 7, 0).astype(np.int32)  # change text only
    _, aux2 = model.apply({"params": params}, other)
    for k in (0, 2, 3):  # image, tabular and signal heads are unaffected by the text
        np.testing.assert_array_equal(aux["modality_outputs"]["severity"][:, k],
                                      aux2["modality_outputs"]["severity"][:, k])


def test_modality_dropout_keeps_at_least_one_modality():
    rng = np.random.default_rng(0)
    present = {m: rng.random(1000) < 0.8 for m in "abcd"}
    present["a"][:10] = True
    for m in "bcd":
        present[m][:10] = False  # these patients have only one modality
    had_any = np.any(np.stack(list(present.values())), 0)
    for rate, key in ((0.0, 0), (0.5, 1), (1.0, 2)):
        kept = drop_modalities(present, rate, jax.random.PRNGKey(key))
        k = np.stack([np.asarray(kept[m]) for m in "abcd"])
        p = np.stack([present[m] for m in "abcd"])
        assert not np.any(k & ~p), "dropout never adds a modality"
        np.testing.assert_array_equal(k.any(0), had_any)
        assert k[:, :10].sum() == 10  # a single modality is never dropped
        if rate == 0.0:
            np.testing.assert_array_equal(k, p)
        if rate == 0.5:
            assert 0.35 < 1 - k.sum() / p.sum() < 0.5


def test_modality_dropout_is_applied_only_in_training():
    batch = make_batch()
    model = make_model("mean", modality_dropout=0.9)
    params = _init(model, batch)
    _, aux = model.apply({"params": params}, batch, train=False)
    for m in aux["present"]:
        np.testing.assert_array_equal(aux["present"][m], batch[m]["present"])
    _, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    dropped = sum(int(np.sum(batch[m]["present"] & ~np.asarray(aux["present"][m]))) for m in aux["present"])
    assert dropped > 0


def test_registry_fails_loudly():
    with pytest.raises(KeyError, match="unknown fusion 'attention'; registered: \\['bottleneck', 'concat'"):
        FUSIONS.get("attention")
    reg = Registry("thing")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)


def test_layer_norm_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 32)).astype(np.float32) * 3 + 1
    g = rng.normal(size=x.shape).astype(np.float32)
    ln = layers.LayerNorm()
    params = ln.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    y, vjp = jax.vjp(lambda p, x: ln.apply(p, x), params, x)
    dp, dx = vjp(jnp.asarray(g))
    with enable_x64():
        def ref(scale, bias, x):
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / jnp.sqrt(var + 1e-6) * scale + bias

        s64, b64 = (np.asarray(params["params"][k], np.float64) for k in ("scale", "bias"))
        y64, vjp64 = jax.vjp(ref, s64, b64, x.astype(np.float64))
        ds, db, dx64 = vjp64(g.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["params"]["scale"], ds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["params"]["bias"], db, rtol=1e-4, atol=1e-4)


def _attention64(q, k, v, mask, heads):
    """float64 masked softmax attention; a query with no key gets zero. q [B, Tq, D] -> [B, Tq, D]."""
    b, tq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    logits = np.where(mask[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(logits - np.max(logits, -1, keepdims=True))
        w = np.nan_to_num(e / e.sum(-1, keepdims=True))
    return (w @ split(v)).transpose(0, 2, 1, 3).reshape(b, tq, d), w


def test_dense_and_attention_match_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = rng.random((2, 5, 5)) < 0.7
    mask[0, 1] = False  # a query with no key: output must be zero
    mha = layers.MultiHeadAttention(num_heads=2)
    params = mha.init(jax.random.PRNGKey(0), x, mask)
    out, w = mha.apply(params, x, mask)
    np.testing.assert_array_equal(out[0, 1], params["params"]["out"]["bias"])  # exactly zero context
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x64 = x.astype(np.float64)
    q, k, v = np.split(x64 @ p["qkv"]["kernel"] + p["qkv"]["bias"], 3, axis=-1)
    ctx, ref_w = _attention64(q, k, v, mask, 2)
    ref = ctx @ p["out"]["kernel"] + p["out"]["bias"]
    assert np.all(ref[0, 1] == p["out"]["bias"])  # zero context -> bias only
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)

    # Attention to a context: q from x, k and v from the context.
    ctx_in = rng.normal(size=(2, 3, 8)).astype(np.float32)
    cmask = rng.random((2, 5, 3)) < 0.6
    params = mha.init(jax.random.PRNGKey(1), x, cmask, context=ctx_in)
    out, _ = mha.apply(params, x, cmask, context=ctx_in)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    k, v = np.split(ctx_in.astype(np.float64) @ p["kv"]["kernel"] + p["kv"]["bias"], 2, axis=-1)
    ctx, _ = _attention64(x64 @ p["q"]["kernel"] + p["q"]["bias"], k, v, cmask, 2)
    np.testing.assert_allclose(out, ctx @ p["out"]["kernel"] + p["out"]["bias"], rtol=1e-5, atol=1e-5)

    dense = layers.Dense(3)
    dp = dense.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(dense.apply(dp, x), x64 @ np.asarray(dp["params"]["kernel"], np.float64)
                               + np.asarray(dp["params"]["bias"], np.float64), rtol=1e-5, atol=1e-5)
    assert np.allclose(nn.Dense(3).apply(dp, x), dense.apply(dp, x), atol=1e-5)


def test_segmented_attention_is_block_diagonal_attention():
    """`segments` gives exactly what full attention gives under a block-diagonal mask, gradients too."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 9, 8)).astype(np.float32)
    mask = rng.random((3, 9, 9)) < 0.6
    segments = (0, 2, 2, 7, 9)  # an empty segment too
    seg = np.repeat(np.arange(4), np.diff(segments))
    block = mask & (seg[:, None] == seg[None, :])
    mha = layers.MultiHeadAttention(num_heads=2)
    params = mha.init(jax.random.PRNGKey(0), x, mask)
    f_seg = lambda p: mha.apply(p, x, mask, segments=segments)[0]
    f_full = lambda p: mha.apply(p, x, block)[0]
    np.testing.assert_allclose(f_seg(params), f_full(params), rtol=1e-5, atol=1e-6)
    g_seg, g_full = (jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p))))(params) for f in (f_seg, f_full))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_seg, g_full)


@pytest.mark.parametrize("n, channels, features, kernel, stride", [
    (50, 1, 8, 9, 1),  # stride 1 (im2col)
    (53, 2, 16, 9, 5),  # im2col (stride * channels <= features), length not a multiple of the stride
    (53, 4, 16, 9, 5),  # shifted GEMMs (stride * channels > features)
    (60, 8, 6, 30, 10),  # shifted GEMMs, 3 blocks per output
    (41, 3, 5, 4, 4),  # one block per output
    (30, 3, 5, 2, 4),  # stride longer than the kernel
    (7, 2, 3, 9, 2),  # kernel longer than the input
])
def test_conv1d_matches_lax_convolution_in_float64(n, channels, features, kernel, stride):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(2, n, channels))
    conv = layers.Conv1D(features, kernel, stride)
    with enable_x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                              conv.init(jax.random.PRNGKey(0), x.astype(np.float32)))
        params["params"]["bias"] = jnp.asarray(rng.normal(size=features))
        conv64 = layers.Conv1D(features, kernel, stride, dtype=jnp.float64, param_dtype=jnp.float64)
        ref_conv = nn.Conv(features, (kernel,), strides=(stride,), dtype=jnp.float64, param_dtype=jnp.float64)
        f = lambda p, x: jnp.sum(jnp.sin(conv64.apply(p, x)))
        f_ref = lambda p, x: jnp.sum(jnp.sin(ref_conv.apply(p, x)))
        x64 = jnp.asarray(x)
        np.testing.assert_allclose(conv64.apply(params, x64), ref_conv.apply(params, x64), rtol=1e-10, atol=1e-10)
        g, g_ref = jax.grad(f, argnums=(0, 1))(params, x64), jax.grad(f_ref, argnums=(0, 1))(params, x64)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10), g, g_ref)
    y32 = conv.apply(params, x.astype(np.float32))
    assert y32.shape == (2, -(-n // stride), features)
    # bfloat16 compute stays within bfloat16 rounding of the float32 result.
    y16 = layers.Conv1D(features, kernel, stride, dtype=jnp.bfloat16).apply(params, x.astype(np.float32))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.03 * float(np.abs(y32).max()))


def _apply_with_dtypes(model, params, batch):
    """(outputs, {path: dtype} of every floating-point value a module call returned)."""
    (outputs, _), state = model.apply({"params": params}, batch, capture_intermediates=True,
                                      mutable=["intermediates"])
    dtypes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            dtypes["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf.dtype
    return outputs, dtypes


def test_bfloat16_compute_keeps_float32_parameters():
    """bfloat16 activations everywhere but where float32 is the design (logits, attention weights, the
    embedding lookup), float32 parameters, and outputs within bfloat16 rounding of the float32 model:
    the error is measured against the outputs' spread across patients (the logits are ~0.1, so an
    absolute tolerance of that size would accept anything). A regression target far from zero catches
    a `target_mean + target_std * z` computed in bfloat16 (its spacing at 100 is 0.5)."""
    batch = make_batch()
    tasks = TASKS[:1] + (TaskSpec("severity", "regression", target_mean=100.0, target_std=5.0),) + TASKS[2:]
    model = make_model("cross_attention", dtype=jnp.bfloat16, tasks=tasks)
    params = _init(model, batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out, dtypes = _apply_with_dtypes(model, params, batch)
    ref, _ = make_model("cross_attention", tasks=tasks).apply({"params": params}, batch)
    for k in ref:
        assert out[k].dtype == jnp.float32, k
        err, spread = float(np.abs(np.asarray(out[k]) - np.asarray(ref[k])).max()), float(np.std(ref[k]))
        assert 0 < err <= 0.06 * spread, (k, err, spread)  # measured: 0.010 to 0.027 of the spread
    float32_by_design = re.compile(r"^(__call__/0/0|heads)/|attention/\d+$|(attn|layer\d+)/__call__/0/1$"
                                   r"|^text_encoder/embedding/")
    assert [p for p, d in dtypes.items() if d != jnp.bfloat16 and not float32_by_design.search(p)] == []
    for m in ("image", "text", "tabular", "signal"):
        assert dtypes[f"{m}_encoder/__call__/0/0"] == jnp.bfloat16, m  # each encoder's tokens
    assert sum(d == jnp.bfloat16 for d in dtypes.values()) > 50


# ---- Models built from declared modalities (`build_model`), no data preparation -------------------

SPECS = (
    ModalitySpec("frontal", "image", shape=(16, 16, 1), mean=(0.5,), std=(0.25,)),
    ModalitySpec("lateral", "image", shape=(16, 16, 1), mean=(0.5,), std=(0.25,)),
    ModalitySpec("report", "text", vocab=("[PAD]", "[UNK]", "[CLS]", "[SEP]") + tuple(f"w{i}" for i in range(46))),
    ModalitySpec("labs", "tabular", numeric=("hr", "sodium", "crp"), mean=(80.0, 140.0, 1.0), std=(12.0, 3.0, 2.0),
                 log_scale=(False, False, True), categorical=("sex", "ward"),
                 categories=(("f", "m"), ("icu", "ed", "floor"))),
    ModalitySpec("ecg", "signal", shape=(180, 12), rate=100.0, channel_names=tuple(f"lead{i}" for i in range(12))),
)
ALL_KINDS = (TaskSpec("findings", "multilabel", ("edema", "effusion", "mass")),
             TaskSpec("view", "multiclass", ("ap", "pa", "lateral", "other")), TaskSpec("dead", "binary"),
             TaskSpec("stay", "regression", target_mean=5.0, target_std=3.0))
TOKENS = {"frontal": 4, "lateral": 16, "report": 12, "labs": 5, "ecg": 4}  # lateral: patch_size 4 (per_modality)


def model_config(fusion="cross_attention", **kw):
    return {"width": 16, "dtype": "float32", "num_heads": 2, "mlp_ratio": 2, "dropout": 0.0, "modality_dropout": 0.0,
            "fusion": {"name": fusion, "depth": 1}, "image": {"patch_size": 8, "depth": 1}, "text": {"depth": 1},
            "tabular": {"depth": 1}, "signal": {"patch_size": 50, "depth": 1},
            "per_modality": '{"lateral": {"patch_size": 4}}', **kw}


@pytest.fixture(scope="module")
def declared():
    """A model over five declared modalities of four kinds and tasks of all four kinds, initialized on
    `fake_batch`, with rows where some modalities are absent."""
    batch = fake_batch(SPECS, ALL_KINDS, B, text_length=12)
    validate_batch(batch, ALL_KINDS, SPECS)
    for name, rows in (("lateral", [0, 1]), ("report", [2]), ("labs", [3]), ("ecg", [0])):
        entry = batch[name]
        entry["present"][rows] = False
        entry["values"][rows] = 0
        if "mask" in entry:
            entry["mask"][rows] = False
        if "categories" in entry:
            entry["categories"][rows] = 0
    model = build_model(model_config(), SPECS, ALL_KINDS)
    params = _init(model, batch)
    out, aux = model.apply({"params": params}, batch)
    return model, params, batch, out, aux


def test_declared_model_shapes_encoders_and_per_modality_settings(declared):
    model, params, batch, out, aux = declared
    assert {m: model.encoders[m]["name"] for m in model.modalities} == {
        "frontal": "image", "lateral": "image", "report": "text", "labs": "tabular", "ecg": "signal"}
    assert model.encoders["lateral"]["patch_size"] == 4 and model.encoders["frontal"]["patch_size"] == 8
    assert model.encoders["report"]["vocab_size"] == 50 and model.encoders["labs"]["category_sizes"] == (4, 5)
    assert out["findings"].shape == (B, 3) and out["view"].shape == (B, 4)
    assert out["dead"].shape == (B,) and out["stay"].shape == (B,)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    seg = np.asarray(aux["token_modality"])
    assert [int(np.sum(seg == i)) for i in range(5)] == [TOKENS[m] for m in model.modalities]
    assert params["labs_encoder"]["category_embedding"].shape == (4 + 5, 16)
    probs = predictions(out, ALL_KINDS)
    np.testing.assert_allclose(np.asarray(probs["view"]).sum(-1), 1.0, rtol=1e-6)  # softmax over the classes
    np.testing.assert_allclose(probs["dead"], jax.nn.sigmoid(out["dead"]))
    np.testing.assert_array_equal(probs["stay"], out["stay"])


def test_declared_model_uses_categories_and_ignores_absent_modalities(declared):
    model, params, batch, out, _ = declared
    apply = lambda b: model.apply({"params": params}, b)[0]
    rng = np.random.default_rng(5)
    other = jax.tree.map(np.copy, batch)
    for name in ("frontal", "lateral", "report", "labs", "ecg"):
        absent = ~batch[name]["present"]
        v = other[name]["values"]
        v[absent] = rng.integers(2, 50, v[absent].shape) if name == "report" else rng.normal(size=v[absent].shape) * 100
        if name == "labs":
            other[name]["categories"][absent] = [3, 4]
    jax.tree.map(np.testing.assert_array_equal, apply(other), out)
    # A categorical value of a present row changes that row's outputs: the embedding is used.
    other = jax.tree.map(np.copy, batch)
    row = 5
    other["labs"]["categories"][row, 1] = (batch["labs"]["categories"][row, 1] + 1) % 5
    changed = apply(other)
    for t in ALL_KINDS:
        assert not np.allclose(changed[t.name][row], out[t.name][row]), t.name
        np.testing.assert_array_equal(np.delete(changed[t.name], row, 0), np.delete(out[t.name], row, 0))


def test_signal_tail_that_does_not_fill_a_patch_is_used(declared):
    model, params, batch, out, _ = declared
    assert batch["ecg"]["values"].shape[1] == 180  # 3 patches of 50 and a tail of 30
    enc = SignalEncoder(width=16, num_heads=2, patch_size=50)
    enc_params = {"params": params["ecg_encoder"]}
    tokens, mask = enc.apply(enc_params, batch["ecg"])
    assert tokens.shape == (B, 4, 16)
    np.testing.assert_array_equal(mask, np.repeat(batch["ecg"]["present"][:, None], 4, 1))
    other = jax.tree.map(np.copy, batch)
    other["ecg"]["values"][:, 150:] += 3.0  # the last 30 steps only
    changed = model.apply({"params": params}, other)[0]
    present = batch["ecg"]["present"]
    assert not np.allclose(changed["stay"][present], out["stay"][present])
    # A recording that ends inside the tail: the padding is masked, its token still real.
    short = jax.tree.map(np.copy, batch["ecg"])
    short["mask"][:, 160:] = False
    _, m = enc.apply(enc_params, short)
    np.testing.assert_array_equal(m, np.repeat(batch["ecg"]["present"][:, None], 4, 1))
    noisy = jax.tree.map(np.copy, short)
    noisy["values"][:, 160:] = 1e3
    np.testing.assert_array_equal(enc.apply(enc_params, noisy)[0], enc.apply(enc_params, short)[0])
    short["mask"][:, 150:] = False  # nothing real in the tail: its token is masked
    np.testing.assert_array_equal(enc.apply(enc_params, short)[1][:, 3], False)


def test_eval_step_averages_predictions_over_signal_windows(declared):
    model, params, batch, _, _ = declared
    rng = np.random.default_rng(4)
    windows = [jax.tree.map(np.copy, batch["ecg"]) for _ in range(3)]
    for w in windows[1:]:
        w["values"] += rng.normal(size=w["values"].shape).astype(np.float32) * w["mask"][..., None]
    windows[2]["mask"][:, 120:] = False
    stacked = {**batch, "ecg": {"values": np.stack([w["values"] for w in windows], 1),
                                "mask": np.stack([w["mask"] for w in windows], 1), "present": batch["ecg"]["present"]}}
    validate_batch(stacked, ALL_KINDS, SPECS)
    got = make_eval_step(model, ALL_KINDS, windowed=("ecg",))(params, stacked)
    each = [make_eval_step(model, ALL_KINDS)(params, {**batch, "ecg": {**w, "present": batch["ecg"]["present"]}})
            for w in windows]
    for t in ALL_KINDS:
        np.testing.assert_allclose(got[t.name], np.mean([p[t.name] for p in each], axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(each[0]["stay"], each[1]["stay"])  # the windows differ


@pytest.mark.parametrize("steps", [50, 31])
def test_signal_of_at_most_one_patch_raises(steps):
    frames = ModalitySpec("ecg", "signal", shape=(steps, 33 * 12))  # spectrogram frames x (bins * leads)
    model = build_model(model_config(per_modality=""), (frames,), ALL_KINDS)
    with pytest.raises(ValueError, match="single token"):
        _init(model, fake_batch((frames,), ALL_KINDS, 2))


def test_regression_head_predicts_in_target_units(declared):
    model, params, batch, out, _ = declared
    unit = tuple(dataclasses.replace(t, target_mean=0.0, target_std=1.0) if t.kind == "regression" else t
                 for t in ALL_KINDS)
    z = build_model(model_config(), SPECS, unit).apply({"params": params}, batch)[0]
    np.testing.assert_allclose(out["stay"], 5.0 + 3.0 * np.asarray(z["stay"]), rtol=1e-6, atol=1e-6)
    assert np.std(out["stay"]) > 2.5 * np.std(z["stay"])
    for t in ("findings", "view", "dead"):  # classification heads are unaffected
        np.testing.assert_array_equal(out[t], z[t])


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"per_modality names unknown modalities \['side'\]"):
        build_model(model_config(per_modality={"side": {"patch_size": 4}}), SPECS, ALL_KINDS)
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_model(model_config(image={"encoder": "vit"}), SPECS, ALL_KINDS)
    with pytest.raises(ValueError, match="not valid JSON"):
        build_model(model_config(per_modality="{lateral: 4}"), SPECS, ALL_KINDS)
    labels = fake_batch(SPECS, ALL_KINDS, 2)
    labels["labels"]["view"] = labels["labels"]["view"].astype(np.float32)
    with pytest.raises(ValueError, match="labels/view"):
        validate_batch(labels, ALL_KINDS, SPECS)


def test_settings_of_other_fusions_and_encoders_come_from_the_registry():
    from mmjax.models.build import encoder_config, fusion_config

    fusion = fusion_config("concat", depth=1)
    assert fusion["name"] == "concat" and fusion["num_bottlenecks"] == 4 and fusion["rank"] == 4
    assert "width" not in fusion and "num_heads" not in fusion  # model-wide, not per fusion
    image = encoder_config("image")
    assert image["encoder"] == "image" and image["patch_size"] == 8 and image["stages"] == "18"
    assert "vocab_size" not in encoder_config("text")  # set from the data
    with pytest.raises(ValueError, match="unknown fusion settings"):
        fusion_config("concat", bottlenecks=3)
    cfg = dict(model_config(), fusion=dict(fusion_config("bottleneck", depth=1), num_bottlenecks=2))
    assert build_model(cfg, SPECS, ALL_KINDS).fusion_kwargs["num_bottlenecks"] == 2
    cfg["fusion"]["name"] = "concat"  # set but meaningless for concat: a warning, not silence
    with pytest.warns(UserWarning, match=r"ConcatFusion has no settings \['num_bottlenecks'\]"):
        model = build_model(cfg, SPECS, ALL_KINDS)
    assert "num_bottlenecks" not in model.fusion_kwargs
    with pytest.raises(ValueError, match="encoder 'resnet' encodes image"):
        build_model(model_config(text={"encoder": "resnet"}), SPECS, ALL_KINDS)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_path_equals_mmjax_attention(dtype):
    """The GPU path (`jax.nn.dot_product_attention`; here its XLA reference, where cuDNN would fall back)
    gives mmjax's attention: outputs, weights and gradients, a query with no key zeroed in both."""
    rng = np.random.default_rng(0)
    b, tq, tk, d, heads = 3, 5, 7, 16, 2
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, d)), dtype) for t in (tq, tk, tk))
    mask = rng.random((b, tq, tk)) < 0.6
    mask[0, 2] = False  # a query with nothing to attend to
    mask[1, :, 0] = True
    mask = jnp.asarray(mask)
    assert not layers.fused_attention_applies(dtype)  # on a CPU mmjax's own path runs
    ref, w_ref = layers._attend(q, k, v, mask, heads, dtype, fused=False)
    out, w = layers._attend_fused(q, k, v, mask, heads, dtype, implementation="xla")
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(out[0, 2], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w_ref))
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.square(f(q, k, v)[0].astype(jnp.float32)))
    g_ref = jax.grad(loss(lambda *a: layers._attend(*a, mask, heads, dtype, fused=False)), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(lambda *a: layers._attend_fused(*a, mask, heads, dtype, implementation="xla")),
                 argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol * 5, rtol=tol * 5)


def test_remat_gives_the_same_gradients_by_recomputing():
    """`model.remat` recomputes the encoders' and the fusion's activations in the backward pass: the
    parameters, the loss and every gradient are those of the model without it (dropout and modality
    dropout included: the recomputation draws the same masks; the fusion still reads the modalities in
    the model's order), and the compiled gradient does the forward work of those parts twice (XLA's
    FLOP count grows). What it saves, activation memory, shows on GPU, not in XLA:CPU's buffer
    assignment (measured: more temporaries with remat there); `benchmarks/gpu_large.sh` measures it."""
    batch = make_batch(b=16)
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def compiled(model):
        """(loss, gradients) of `model` at `params`, and the compiled gradient's FLOPs."""
        def loss(p):
            out, _ = model.apply({"params": p}, batch, train=True, rngs=rngs)
            return sum(jnp.sum(jnp.square(v)) for v in out.values())
        fn = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        cost = fn.cost_analysis()
        return fn(params), (cost[0] if isinstance(cost, list) else cost)["flops"]

    def make(**kw):  # two modalities, not in alphabetical order (a dict through nn.remat would sort them)
        return MultimodalModel(modalities=("text", "image"), tasks=TASKS, fusion="cross_attention", width=16,
                               encoders={"image": {"name": "image", "patch_size": 8},
                                         "text": {"name": "text", "vocab_size": 50}},
                               fusion_kwargs={"depth": 2, "num_heads": 2}, modality_dropout=0.3, **kw)

    plain = make()
    params = jax.jit(lambda b: _init(plain, b))(batch)
    (v_ref, g_ref), flops_ref = compiled(plain)
    added = {}
    for parts in (("encoders",), ("encoders", "fusion")):
        model = make(remat=parts)
        shapes = jax.eval_shape(lambda b, model=model: _init(model, b), batch)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
        (v, g), flops = compiled(model)
        np.testing.assert_allclose(v, v_ref, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_ref)
        added[parts] = flops - flops_ref
    # each part adds its own recompute
    assert added[("encoders",)] > 0.03 * flops_ref and added[("encoders", "fusion")] > added[("encoders",)] \
        + 0.03 * flops_ref, added
    with pytest.raises(ValueError, match="model.remat: unknown parts \\['blocks'\\]"):
        jax.eval_shape(lambda b: _init(make_model("concat", remat=("blocks",)), b), batch)
