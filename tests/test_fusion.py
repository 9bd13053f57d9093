"""The shared test every registered fusion passes (adding one to `FUSIONS` enrols it), on 1 to 6
modalities, plus references for the methods with a closed form."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion.tensor import TensorFusion

WIDTH = 16
LENGTHS = (4, 6, 3, 5, 2, 3)  # tokens of modality 0..5


def make_inputs(num_modalities, seed=0):
    """Tokens and masks where row r has exactly the modalities of subset r (every subset of the M
    modalities once, the empty one included); a present modality has >= 1 valid token."""
    rng = np.random.default_rng(seed)
    subsets = list(itertools.product([False, True], repeat=num_modalities))  # 2^M rows
    b = len(subsets)
    tokens, masks = {}, {}
    for i in range(num_modalities):
        t = LENGTHS[i]
        name = f"m{i}"
        tokens[name] = rng.normal(size=(b, t, WIDTH)).astype(np.float32)
        mask = rng.random((b, t)) < 0.6
        mask[:, 0] = True
        present = np.array([s[i] for s in subsets])
        masks[name] = mask & present[:, None]
    return tokens, masks


def with_noise(tokens, masks, seed=1, scale=100.0):
    rng = np.random.default_rng(seed)
    return {m: np.where(masks[m][..., None], tokens[m], rng.normal(size=tokens[m].shape) * scale).astype(np.float32)
            for m in tokens}


def make_fusion(name, dtype=jnp.float32):
    return FUSIONS.get(name)(width=WIDTH, num_heads=2, depth=2, dtype=dtype)  # depth 2: bottleneck exchanges


# Six modalities for the fusions whose structure grows with the count (a tensor product, pairs,
# shared bottleneck tokens, per-modality cross-attention); the others are checked at 1 and 3.
SIX_MODALITIES = ("tensor", "pairwise_cross", "bottleneck", "cross_attention")


@pytest.mark.parametrize("fusion,num_modalities", [(f, m) for f in FUSIONS.names() for m in (1, 3, 6)
                                                   if m < 6 or f in SIX_MODALITIES])
def test_fusion_contract(fusion, num_modalities):
    """Shapes; absent modalities and masked tokens (set to noise) change no output bit and get zero
    gradient; a patient's output does not depend on the others in the batch; finite gradients; one
    compilation for batches of one shape; bfloat16 compute within bfloat16 rounding of float32
    (measured against the outputs' spread over patients)."""
    tokens, masks = make_inputs(num_modalities)
    module = make_fusion(fusion)
    params = jax.jit(module.init)({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, tokens, masks)
    others = make_inputs(num_modalities, seed=5)[0]  # patients 0 and -1 kept, the rest replaced
    mixed = {k: np.concatenate([tokens[k][:1], others[k][1:-1], tokens[k][-1:]]) for k in tokens}

    def loss(p, x):
        f, fm, _ = module.apply(p, x, masks)
        return jnp.sum(jnp.where(fm[..., None], f, 0) ** 2)

    traces = []

    @jax.jit  # one compilation for the whole case
    def run(p, clean, noisy, mixed, masks):
        traces.append(1)
        return (module.apply(p, clean, masks), module.apply(p, noisy, masks), module.apply(p, mixed, masks)[0],
                jax.grad(loss, argnums=(0, 1))(p, clean), make_fusion(fusion, jnp.bfloat16).apply(
                    p, jax.tree.map(lambda v: v.astype(jnp.bfloat16), clean), masks)[0])

    out, out_noisy, out_mixed, (g_params, g_tokens), half = run(params, tokens, with_noise(tokens, masks), mixed, masks)
    run(params, mixed, tokens, tokens, make_inputs(num_modalities, seed=9)[1])  # other values and masks
    assert len(traces) == 1
    fused, fused_mask, aux = out
    b, m = 2 ** num_modalities, num_modalities
    assert fused.shape[0] == b and fused.shape[2] == WIDTH and fused.shape[1] in (1, m)
    assert fused_mask.shape == fused.shape[:2] and fused_mask.dtype == jnp.bool_
    present = np.stack([masks[k].any(1) for k in tokens], 1)
    if fused.shape[1] == 1:
        np.testing.assert_array_equal(fused_mask[:, 0], present.any(1))
    else:
        np.testing.assert_array_equal(fused_mask, present)
    assert set(aux["embeddings"]) == set(tokens)
    if "fused_weights" in aux:  # decision weights: exactly 0 for an absent modality, sum 1 over present ones
        w = np.asarray(aux["fused_weights"])
        assert np.all(w[~present] == 0)
        np.testing.assert_allclose(w.sum(1)[present.any(1)], 1.0, rtol=1e-6)
    if "gates" in aux:  # gated: exactly 0 for an absent modality, sum 1 over present ones (per feature)
        g = np.asarray(aux["gates"])
        assert np.all(g[~present] == 0)
        np.testing.assert_allclose(g.sum(1)[present.any(1)], 1.0, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(fused)))
    jax.tree.map(np.testing.assert_array_equal, out, out_noisy)  # absent and masked content: no bit changes
    np.testing.assert_allclose(np.asarray(out_mixed)[[0, -1]], np.asarray(fused)[[0, -1]], rtol=1e-5, atol=1e-6)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g_params))
    for k in tokens:
        assert np.all(np.asarray(g_tokens[k])[~masks[k]] == 0), k  # masked content has no influence
        assert np.abs(np.asarray(g_tokens[k])[masks[k]]).max() > 0, k  # valid content does
    assert half.dtype == jnp.bfloat16
    err, spread = float(np.abs(np.asarray(half, np.float32) - np.asarray(fused)).max()), float(np.std(fused))
    assert err <= 0.1 * spread, (err, spread)


def test_tensor_fusion_matches_a_float64_outer_product_and_guards_its_size():
    tokens, masks = make_inputs(2)
    module = TensorFusion(width=WIDTH, tensor_dim=3)
    params = module.init(jax.random.PRNGKey(0), tokens, masks)
    fused = np.asarray(module.apply(params, tokens, masks)[0][:, 0], np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    z = []
    for m in tokens:
        w = masks[m].astype(np.float64)[..., None]
        pooled = (tokens[m] * w).sum(1) / np.maximum(w.sum(1), 1)
        zi = pooled @ p[f"project_{m}"]["kernel"] + p[f"project_{m}"]["bias"]
        zi = np.where(masks[m].any(1)[:, None], zi, 0)
        z.append(np.concatenate([zi, np.ones((len(zi), 1))], 1))
    outer = np.einsum("bi,bj->bij", *z).reshape(len(z[0]), -1)
    pre = outer @ p["mix"]["kernel"] + p["mix"]["bias"]
    ref = jax.nn.gelu(pre)
    np.testing.assert_allclose(fused, np.asarray(ref), rtol=1e-4, atol=1e-5)
    assert TensorFusion(width=WIDTH).dim(6) == 4 and TensorFusion(width=WIDTH).dim(2) == 16
    with pytest.raises(ValueError, match="even at tensor_dim=1"):
        TensorFusion(width=WIDTH).dim(16)
    with pytest.raises(ValueError, match="tensor_dim=20 has 194,481 features.*low_rank"):
        TensorFusion(width=WIDTH, tensor_dim=20).init(jax.random.PRNGKey(0), *make_inputs(4)[:2])


def test_low_rank_fusion_equals_its_full_tensor_in_float64():
    """LMF's sum over ranks of products of per-modality factors is the tensor-fusion weight
    W = sum_r w_r (x)_m W_m^(r) applied to the outer product of the [z_m; 1] vectors."""
    tokens, masks = make_inputs(2)
    module = FUSIONS.get("low_rank")(width=WIDTH, rank=3)
    params = module.init(jax.random.PRNGKey(0), tokens, masks)
    fused = np.asarray(module.apply(params, tokens, masks)[0][:, 0], np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    z = []
    for m in tokens:
        w = masks[m].astype(np.float64)[..., None]
        pooled = np.where(masks[m].any(1)[:, None], (tokens[m] * w).sum(1) / np.maximum(w.sum(1), 1), 0)
        z.append(np.concatenate([pooled, np.ones((len(pooled), 1))], 1))
    f0 = p["factor_m0"]["kernel"].reshape(WIDTH + 1, 3, WIDTH)
    f1 = p["factor_m1"]["kernel"].reshape(WIDTH + 1, 3, WIDTH)
    full = np.einsum("ird,jrd,r->ijd", f0, f1, p["rank_weight"])  # [(D+1), (D+1), D]
    pre = np.einsum("bi,bj,ijd->bd", z[0], z[1], full) + p["bias"]
    np.testing.assert_allclose(fused, np.asarray(jax.nn.gelu(pre)), rtol=1e-4, atol=1e-5)


def test_bottleneck_modalities_exchange_only_through_bottleneck_tokens():
    """Before the fusion layer a modality's tokens depend on nothing else; from it on, the others
    reach it through the bottleneck tokens."""
    tokens, masks = make_inputs(2)
    module = FUSIONS.get("bottleneck")(width=WIDTH, num_heads=2, depth=2, fusion_layer=2, num_bottlenecks=3)
    params = module.init(jax.random.PRNGKey(0), tokens, masks)
    # fusion_layer = depth: no exchange at all, so modality 1's content cannot change modality 0's embedding
    changed = dict(tokens, m1=np.random.default_rng(2).normal(size=tokens["m1"].shape).astype(np.float32))
    e0 = module.apply(params, tokens, masks)[2]["embeddings"]["m0"]
    e1 = module.apply(params, changed, masks)[2]["embeddings"]["m0"]
    np.testing.assert_array_equal(e0, e1)
    mixing = FUSIONS.get("bottleneck")(width=WIDTH, num_heads=2, depth=2, fusion_layer=0, num_bottlenecks=3)
    params = mixing.init(jax.random.PRNGKey(0), tokens, masks)
    both = masks["m0"].any(1) & masks["m1"].any(1)
    e0 = np.asarray(mixing.apply(params, tokens, masks)[2]["embeddings"]["m0"])
    e1 = np.asarray(mixing.apply(params, changed, masks)[2]["embeddings"]["m0"])
    assert both.any() and not np.allclose(e0[both], e1[both])


def test_bottleneck_update_of_an_absent_modality_is_left_out():
    """An absent modality's layer still updates the bottleneck tokens (from the bottleneck alone);
    that update must not enter the average: changing only that modality's layer weights changes no
    output of a patient who lacks it."""
    tokens, masks = make_inputs(3)
    module = FUSIONS.get("bottleneck")(width=WIDTH, num_heads=2, depth=2, fusion_layer=0, num_bottlenecks=3)
    params = module.init(jax.random.PRNGKey(0), tokens, masks)
    rng = np.random.default_rng(4)
    other = jax.tree_util.tree_map_with_path(
        lambda path, p: p.at[1].set(rng.normal(size=p.shape[1:])) if "layer" in jax.tree_util.keystr(path) else p,
        params)
    a, b = module.apply(params, tokens, masks)[0], module.apply(other, tokens, masks)[0]
    lacks = ~masks["m1"].any(1)
    np.testing.assert_array_equal(np.asarray(a)[lacks], np.asarray(b)[lacks])
    assert not np.allclose(np.asarray(a)[~lacks], np.asarray(b)[~lacks])
