"""Every registered encoder against the encoder contract, and the convolutional, recurrent and MLP
encoders against float64 references and their own promises (padding, missing values, stems)."""

import functools

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

from mmjax.batch import ModalitySpec, TaskSpec, fake_batch
from mmjax.models import layers
from mmjax.models.build import build_model, encoder_config, fusion_config
from mmjax.models.encoders import ENCODERS, rnn

B = 5
KEY = jax.random.PRNGKey(0)
CATEGORY_SIZES = (4, 5)
# Tiny settings per encoder (an encoder not listed runs with its defaults); what the data decides
# (vocabulary, categorical columns) is added where the encoder declares it.
SMALL = {
    "image": {"patch_size": 8}, "resnet": {"stages": "small", "base_channels": 8},
    "rnn": {"hidden": 8}, "mlp": {"hidden": 16},
    "signal": {"patch_size": 10}, "resnet1d": {"stages": "small", "base_channels": 8},
    "inception1d": {"filters": 4, "bottleneck": 4, "kernel_sizes": (9, 5), "patch_size": 8,
                    "inception_modules": 3},
}
FROM_DATA = {"vocab_size": 50, "category_sizes": CATEGORY_SIZES}


def make_encoder(name, **kw):
    cls = ENCODERS.get(name)
    fields = set(cls.__dataclass_fields__)
    settings = {k: v for k, v in FROM_DATA.items() if k in fields}
    return cls(width=16, num_heads=2, **{**settings, **SMALL.get(name, {}), **kw})


def make_inputs(kind, seed=0, b=B):
    """One modality's batch entry: patient 0 absent, patient 1 present, the rest at random; absent
    rows zero with an all-False mask, as the batch contract says."""
    rng = np.random.default_rng(seed)
    present = rng.random(b) < 0.7
    present[:2] = False, True
    if kind == "image":
        entry = {"values": rng.normal(size=(b, 16, 16, 1)).astype(np.float32)}
    elif kind == "text":
        mask = np.arange(12)[None] < rng.integers(1, 13, b)[:, None]
        entry = {"values": rng.integers(2, 50, (b, 12)).astype(np.int32) * mask, "mask": mask}
    elif kind == "tabular":
        entry = {"values": rng.normal(size=(b, 5)).astype(np.float32), "mask": rng.random((b, 5)) < 0.7,
                 "categories": np.stack([rng.integers(0, n, b) for n in CATEGORY_SIZES], 1).astype(np.int32)}
    else:
        mask = np.arange(64)[None] < rng.integers(20, 65, b)[:, None]
        entry = {"values": rng.normal(size=(b, 64, 2)).astype(np.float32) * mask[..., None], "mask": mask}
    entry["present"] = present
    for k, v in entry.items():
        if k != "present":
            v[~present] = 0
    if "mask" in entry:
        entry["mask"] &= present[:, None]
    return entry


def with_noise(kind, entry, seed=1):
    """The entry with everything the encoder must ignore replaced by noise: absent patients' values,
    padding tokens, masked time steps, unobserved lab values (NaN among them)."""
    rng = np.random.default_rng(seed)
    out = {k: np.copy(v) for k, v in entry.items()}
    v = out["values"]
    if kind == "image":
        v[~entry["present"]] = rng.normal(size=v[~entry["present"]].shape) * 100
    elif kind == "text":
        out["values"] = np.where(entry["mask"], v, rng.integers(1, 50, v.shape)).astype(np.int32)
    elif kind == "tabular":
        noise = np.where(rng.random(v.shape) < 0.2, np.nan, rng.normal(size=v.shape) * 1e3)
        out["values"] = np.where(entry["mask"], v, noise).astype(np.float32)
        out["categories"][~entry["present"]] = [n - 1 for n in CATEGORY_SIZES]
    else:
        out["values"] = np.where(entry["mask"][..., None], v, rng.normal(size=v.shape) * 100).astype(np.float32)
    return out


def random_params(init, *args, seed=0):
    """Parameters of the right shapes without compiling `init` (on XLA:CPU the initializers' random
    number generation compiles slower than the encoders' forward and backward passes, and these tests
    are compile-bound): normal, 1 / sqrt(fan-in) for kernels and embeddings, 1 + N(0, 0.1) for norm
    scales, N(0, 0.1) otherwise."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        x = rng.normal(size=leaf.shape)
        if leaf.ndim >= 2:
            x /= np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            x = x * 0.1 + (name == "scale")
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init, KEY, *args))


@functools.cache
def _compiled(name):
    """The encoder, its parameters and one jitted function for everything the contract test asks:
    entry -> (tokens, mask, gradients of a loss on the valid tokens)."""
    enc = make_encoder(name)

    def loss(params, entry):
        tokens, mask = enc.apply(params, entry)
        return jnp.sum(jnp.sin(tokens) * mask[..., None]), (tokens, mask)

    jitted = jax.jit(jax.value_and_grad(loss, has_aux=True))
    params = random_params(enc.init, make_inputs(enc.kind))

    def run(entry):
        (_, (tokens, mask)), grads = jitted(params, entry)
        return np.asarray(tokens), np.asarray(mask), [np.asarray(g) for g in jax.tree.leaves(grads)]

    return enc, params, run


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_contract(name):
    enc, _, run = _compiled(name)
    entry = make_inputs(enc.kind)
    x, mask, grads = run(entry)
    assert x.ndim == 3 and x.shape[0] == B and x.shape[2] == 16 and x.dtype == np.float32
    assert mask.shape == x.shape[:2] and mask.dtype == np.bool_
    absent = ~entry["present"]
    assert not mask[absent].any() and np.all(x[absent] == 0)
    assert mask[~absent].any(axis=1).all()
    assert np.isfinite(x).all()
    # Finite gradients of a loss on the valid tokens, reaching every parameter.
    assert all(np.isfinite(g).all() for g in grads)
    assert all(np.abs(g).sum() > 0 for g in grads)

    # What must be ignored changes no valid output bit.
    x2, mask2, _ = run(with_noise(enc.kind, entry))
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(x2[mask], x[mask])
    assert np.all(x2[absent] == 0)

    # A patient's tokens do not depend on the rest of the batch (patients 0 and 1 kept, 2.. replaced).
    other = make_inputs(enc.kind, seed=7)
    x3, _, _ = run({k: np.concatenate([entry[k][:2], other[k][2:]]) for k in entry})
    np.testing.assert_allclose(x3[:2], x[:2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(x3[2:], x[2:])


# ---- GroupNorm (the convolutional encoders' norm) ------------------------------------------------

def test_group_norm_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 10, 8)) * 2 + 1).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    mask = rng.random((3, 10)) < 0.6
    mask[2] = False  # no valid position: finite, not NaN
    gn = layers.GroupNorm(num_groups=4)
    params = gn.init(KEY, x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    y, vjp = jax.vjp(lambda p, x: gn.apply(p, x, mask), params, x)
    dp, dx = vjp(jnp.asarray(g))
    with enable_x64():
        def ref(scale, bias, x):
            xg = x.reshape(3, 10, 4, 2)
            w = jnp.asarray(mask, jnp.float64)[:, :, None, None]
            n = jnp.maximum(w.sum(1, keepdims=True) * 2, 1)
            mean = (xg * w).sum((1, 3), keepdims=True) / n
            var = ((xg - mean) ** 2 * w).sum((1, 3), keepdims=True) / n
            return ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias

        p64 = [np.asarray(params["params"][k], np.float64) for k in ("scale", "bias")]
        y64, vjp64 = jax.vjp(ref, *p64, x.astype(np.float64))
        ds, db, dx64 = vjp64(g.astype(np.float64))
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["params"]["scale"], ds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["params"]["bias"], db, rtol=1e-4, atol=1e-4)
    # Unmasked, it is flax's GroupNorm with the same parameters.
    import flax.linen as nn

    np.testing.assert_allclose(gn.apply(params, x), nn.GroupNorm(4, epsilon=1e-5).apply(params, x),
                               rtol=1e-5, atol=1e-5)


# ---- resnet --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, stem, stages, grid", [
    (16, "auto", "small", 4),  # 3x3 stem of stride 1, two halvings
    (64, "auto", "small", 16),  # still "small" at 64 px
    (72, "auto", "small", 5),  # 7x7 stride-2 stem and a stride-2 max pool: 72 -> 18 -> 5 after two halvings
    (16, "large", "18", 1),
])
def test_resnet_stem_and_token_grid(size, stem, stages, grid):
    enc = make_encoder("resnet", stem=stem, stages=stages, base_channels=4)
    entry = {"values": np.ones((1, size, size, 1), np.float32), "present": np.ones(1, bool)}
    shapes = jax.eval_shape(enc.init, KEY, entry)["params"]
    x, mask = jax.eval_shape(enc.apply, {"params": shapes}, entry)
    assert x.shape == (1, grid * grid, 16) and mask.shape == (1, grid * grid)
    assert shapes["stem"]["kernel"].shape[0] == (7 if size > 64 or stem == "large" else 3)


# ---- rnn -----------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrence_matches_float64_reference(cell, reverse):
    """GRU (Cho et al., flax's GRUCell equations) and LSTM, each direction, against a float64 loop over
    each sequence's valid steps only: the backward direction starts at the last valid step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)
    lengths = np.array([7, 4, 1])
    mod = rnn.Recurrence(cell, 6, reverse, jnp.float32)
    params = mod.init(KEY, x, lengths)
    out = np.asarray(mod.apply(params, x, lengths))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    wi, bi, wh = p["input"]["kernel"], p["input"]["bias"], p["cell"]["recurrent"]["kernel"]
    for row, n in enumerate(lengths):
        h, c, ref = np.zeros(6), np.zeros(6), np.zeros((n, 6))
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            xp = x[row, t].astype(np.float64) @ wi + bi
            if cell == "gru":
                hp = h @ wh + p["cell"]["recurrent"]["bias"]
                r, z = _sigmoid(xp[:6] + hp[:6]), _sigmoid(xp[6:12] + hp[6:12])
                h = (1 - z) * np.tanh(xp[12:] + r * hp[12:]) + z * h
            else:
                i, f, g, o = np.split(xp + h @ wh, 4)
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
            ref[t] = h
        np.testing.assert_allclose(out[row, :n], ref, rtol=1e-5, atol=1e-6)


def test_rnn_valid_tokens_ignore_padding_length_and_gaps():
    enc, params, _ = _compiled("rnn")
    entry = make_inputs("text")
    apply = jax.jit(enc.apply)
    x, mask = (np.asarray(a) for a in apply(params, entry))
    # Longer padding (20 instead of 12 positions), filled with token ids: the same valid outputs.
    longer = {"values": np.pad(entry["values"], ((0, 0), (0, 8)), constant_values=7),
              "mask": np.pad(entry["mask"], ((0, 0), (0, 8))), "present": entry["present"]}
    x2, mask2 = (np.asarray(a) for a in apply(params, longer))
    np.testing.assert_array_equal(mask2[:, :12], mask)
    np.testing.assert_allclose(x2[:, :12][mask], x[mask], rtol=1e-6, atol=1e-6)
    # A gap inside the mask: the valid tokens are read as one sequence, in order.
    row = int(np.argmax(mask.sum(1) >= 4))
    gapped = {k: np.copy(v) for k, v in entry.items()}
    n = mask[row].sum()
    gapped["values"][row, 3:n + 1], gapped["mask"][row, 3:n + 1] = entry["values"][row, 2:n], True
    gapped["values"][row, 2], gapped["mask"][row, 2] = 9, False
    x3, mask3 = (np.asarray(a) for a in apply(params, gapped))
    np.testing.assert_allclose(x3[row][mask3[row]], x[row][mask[row]], rtol=1e-6, atol=1e-6)
    assert np.all(x3[row, 2] == 0)
    # ... while a valid token's content does change the outputs, in both directions.
    changed = {k: np.copy(v) for k, v in entry.items()}
    changed["values"][row, 1] = (entry["values"][row, 1] + 1) % 50
    x4 = np.asarray(apply(params, changed)[0])
    assert not np.allclose(x4[row, 0], x[row, 0]) and not np.allclose(x4[row, 2], x[row, 2])


# ---- mlp -----------------------------------------------------------------------------------------

def test_mlp_matches_float64_reference_and_uses_the_missing_indicator():
    enc = make_encoder("mlp", layers=2, embedding_dim=3)
    entry = make_inputs("tabular")
    params = enc.init(KEY, entry)
    x, mask = enc.apply(params, entry)
    assert x.shape == (B, 1, 16)
    np.testing.assert_array_equal(mask[:, 0], entry["present"])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    obs = entry["mask"].astype(np.float64)
    offsets = np.cumsum((0,) + CATEGORY_SIZES[:-1])
    emb = p["category_embedding"][entry["categories"] + offsets].reshape(B, -1)
    h = np.concatenate([entry["values"] * obs, obs, emb], axis=1)
    for i in range(2):
        h = h @ p[f"fc{i}"]["kernel"] + p[f"fc{i}"]["bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # nn.gelu (tanh form)
    t = h @ p["token_projection"]["kernel"] + p["token_projection"]["bias"]
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    t = t * p["norm"]["scale"] + p["norm"]["bias"]
    ref = np.where(entry["present"][:, None], t, 0)
    np.testing.assert_allclose(x[:, 0], ref, rtol=1e-5, atol=1e-5)
    # A value of 0 that was measured is not a missing value.
    row = 1
    col = int(np.argmin(entry["mask"][row]))
    assert not entry["mask"][row, col]
    measured = {k: np.copy(v) for k, v in entry.items()}
    measured["mask"][row, col] = True
    measured["values"][row, col] = 0.0
    assert not np.allclose(enc.apply(params, measured)[0][row], x[row])


# ---- resnet1d and inception1d --------------------------------------------------------------------

@pytest.mark.parametrize("name, valid, step", [("resnet1d", 48, 16), ("inception1d", 40, 8)])
def test_signal_tokens_ignore_padding_and_pool_the_time_mask(name, valid, step):
    """A recording padded with masked steps gives the tokens of the same recording alone (padding
    neither enters a statistic nor the max pool); the token mask is the time mask max-pooled."""
    enc, params, _ = _compiled(name)  # its parameters do not depend on the length
    rng = np.random.default_rng(0)
    short = {"values": rng.normal(size=(2, valid, 2)).astype(np.float32) - 1.0,  # negative: max pool sees it
             "mask": np.ones((2, valid), bool), "present": np.ones(2, bool)}
    apply = jax.jit(enc.apply)
    x, mask = apply(params, short)
    tokens = valid // step
    assert x.shape == (2, tokens, 16) and np.asarray(mask).all()
    padded = {"values": np.pad(short["values"], ((0, 0), (0, 2 * step), (0, 0)), constant_values=5.0),
              "mask": np.pad(short["mask"], ((0, 0), (0, 2 * step))), "present": short["present"]}
    x2, mask2 = apply(params, padded)
    np.testing.assert_array_equal(mask2, np.arange(tokens + 2)[None].repeat(2, 0) < tokens)
    np.testing.assert_allclose(np.asarray(x2)[:, :tokens], x, rtol=1e-5, atol=1e-5)
    # A recording that ends inside a token's steps keeps that token real.
    partial = {**padded, "mask": np.arange(valid + 2 * step)[None].repeat(2, 0) < valid + 1}
    np.testing.assert_array_equal(np.asarray(apply(params, partial)[1])[:, tokens], True)


def test_resnet1d_reads_spectrogram_frames():
    enc = make_encoder("resnet1d")
    frames = {"values": np.ones((2, 40, 33), np.float32), "mask": np.ones((2, 40), bool),
              "present": np.array([True, False])}
    shapes = jax.eval_shape(enc.init, KEY, frames)
    x, mask = jax.eval_shape(enc.apply, shapes, frames)
    assert x.shape == (2, 3, 16)  # 40 frames padded to 48, one token per 16


# ---- the new encoders in a model built from a config ---------------------------------------------

SPECS = (
    ModalitySpec("frontal", "image", shape=(16, 16, 1), mean=(0.5,), std=(0.25,)),
    ModalitySpec("lateral", "image", shape=(16, 16, 1), mean=(0.5,), std=(0.25,)),
    ModalitySpec("report", "text", vocab=("[PAD]", "[UNK]") + tuple(f"w{i}" for i in range(48))),
    ModalitySpec("labs", "tabular", numeric=("hr", "crp"), mean=(80.0, 1.0), std=(12.0, 2.0),
                 categorical=("sex",), categories=(("f", "m"),)),
    ModalitySpec("ecg", "signal", shape=(100, 3), rate=100.0),
)
TASKS = (TaskSpec("findings", "multilabel", ("a", "b")), TaskSpec("dead", "binary"))


def test_build_model_with_the_new_encoders():
    m = {"width": 16, "dtype": "float32", "num_heads": 2, "mlp_ratio": 2, "dropout": 0.0, "modality_dropout": 0.0,
         "fusion": fusion_config("mean"),
         "image": encoder_config("image", "resnet", stages="small", base_channels=8),
         "text": encoder_config("text", "rnn", hidden=8, layers=2),
         "tabular": encoder_config("tabular", "mlp", hidden=16),
         "signal": encoder_config("signal", "resnet1d", stages="small", base_channels=8),
         "per_modality": {"lateral": {"stem": "large"}}}
    assert m["image"]["patch_size"] == 8  # the default encoder's settings are in the block too
    model = build_model(m, SPECS, TASKS)
    assert {k: v["name"] for k, v in model.encoders.items()} == {
        "frontal": "resnet", "lateral": "resnet", "report": "rnn", "labs": "mlp", "ecg": "resnet1d"}
    assert "patch_size" not in model.encoders["frontal"] and model.encoders["report"]["vocab_size"] == 50
    with pytest.raises(ValueError, match="encoder 'resnet' has no settings"):
        build_model({**m, "per_modality": {"lateral": {"cell": "gru"}}}, SPECS, TASKS)

    batch = fake_batch(SPECS, TASKS, 3, text_length=10)
    del batch["patient_id"]  # host only
    batch["ecg"]["present"][0] = False
    batch["ecg"]["values"][0], batch["ecg"]["mask"][0] = 0, False
    init = functools.partial(model.init_with_output, capture_intermediates=True)
    (_, _), variables = jax.eval_shape(init, KEY, batch)
    tokens = {name: variables["intermediates"][f"{name}_encoder"]["__call__"][0][0].shape for name in model.modalities}
    # 4x4 (3x3 stem), 1x1 (7x7 stem and max pool), the text's length, one token, 100 steps padded to 112 / 16
    assert tokens == {"frontal": (3, 16, 16), "lateral": (3, 1, 16), "report": (3, 10, 16), "labs": (3, 1, 16),
                      "ecg": (3, 7, 16)}
    # A forward pass (one image modality: each resnet compiles on its own).
    model = build_model({**m, "per_modality": {}}, SPECS[:1] + SPECS[2:], TASKS)
    batch.pop("lateral")
    out, _ = jax.jit(model.apply)(random_params(model.init, batch), batch)
    assert out["findings"].shape == (3, 2) and out["dead"].shape == (3,)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
