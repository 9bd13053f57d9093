"""The mmjax multimodal model (cross-attention fusion) written in plain PyTorch eager, layer for layer,
so the whole train step can be timed against mmjax's (`benchmarks/step_vs_torch.py`).

Every submodule carries the name of its flax counterpart, and `load_flax_params` copies a flax
parameter tree into it, so the two models compute the same function: `step_vs_torch.py --check`
asserts equal outputs, losses and gradients before it times anything.

This is a benchmark, not part of the library: mmjax never imports PyTorch.
"""

from __future__ import annotations

import math

import einops
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_NEG = -1e9


def _gelu(x):
    return F.gelu(x, approximate="tanh")  # flax nn.gelu's default


def _layer_norm(d):
    return nn.LayerNorm(d, eps=1e-6)


def masked_mean(x, mask):
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(_gelu(self.fc1(x)))


class Attention(nn.Module):
    """Masked multi-head self-attention (`mask` bool [B, T, T]); a query with no key gets zero;
    `segments` restricts it to diagonal blocks, as in mmjax.

    `sdpa=True` uses `F.scaled_dot_product_attention` with an additive mask, otherwise matmuls
    and a softmax over all heads at once, as a PyTorch user would write either."""

    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def _attend(self, q, k, v, mask):
        b, t, d = q.shape
        hd = d // self.heads
        q, k, v = (x.reshape(b, t, self.heads, hd).transpose(1, 2) for x in (q, k, v))
        if self.sdpa:
            bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, _NEG)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            out = logits.masked_fill(~mask[:, None], _NEG).softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, t, d) * mask.any(-1)[..., None].to(q.dtype)

    def forward(self, x, mask, segments=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if segments is None:
            out = self._attend(q, k, v, mask)
        else:
            out = torch.cat([self._attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi, lo:hi])
                             for lo, hi in zip(segments[:-1], segments[1:]) if hi > lo], dim=1)
        return self.out(out)


class Block(nn.Module):
    def __init__(self, d, heads, ratio, sdpa):
        super().__init__()
        self.ln1, self.ln2 = _layer_norm(d), _layer_norm(d)
        self.attn = Attention(d, heads, sdpa)
        self.mlp = MLP(d, ratio * d)

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, mask[:, :, None] & mask[:, None, :])
        return x + self.mlp(self.ln2(x))


class Trunk(nn.Module):
    def __init__(self, tokens, d, depth, heads, ratio, sdpa):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(tokens, d))
        self.blocks = nn.ModuleList(Block(d, heads, ratio, sdpa) for _ in range(depth))
        self.norm = _layer_norm(d)

    def forward(self, x, mask):
        x = x + self.pos_embedding
        for block in self.blocks:
            x = block(x, mask)
        return torch.where(mask[..., None], self.norm(x), 0.0)


class ImageEncoder(nn.Module):
    def __init__(self, shape, patch, d, trunk):
        super().__init__()
        h, w, c = shape
        self.patch = patch
        self.patch_embedding = nn.Linear(patch * patch * c, d)
        self.trunk = Trunk((h // patch) * (w // patch), d, **trunk)

    def forward(self, inp):
        p = self.patch
        x = einops.rearrange(inp["values"], "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        tokens = self.patch_embedding(x)
        mask = inp["present"][:, None].expand(tokens.shape[:2])
        return self.trunk(tokens, mask), mask


class TextEncoder(nn.Module):
    def __init__(self, length, vocab, d, trunk):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.trunk = Trunk(length, d, **trunk)

    def forward(self, inp):
        mask = inp["mask"] & inp["present"][:, None]
        return self.trunk(self.embedding(inp["values"]), mask), mask


class TabularEncoder(nn.Module):
    def __init__(self, features, d, trunk):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(features, d))
        self.feature_bias = nn.Parameter(torch.zeros(features, d))
        self.missing_embedding = nn.Parameter(torch.zeros(features, d))
        self.trunk = Trunk(features, d, **trunk)

    def forward(self, inp):
        x = inp["values"]
        tokens = torch.where(inp["mask"][..., None], x[..., None] * self.feature_weight + self.feature_bias,
                             self.missing_embedding)
        mask = inp["present"][:, None].expand(x.shape)
        return self.trunk(tokens, mask), mask


def _same_conv(conv, x):
    """`conv` over x [B, C, T] with XLA's 'SAME' padding (what flax nn.Conv does by default)."""
    k, s, n = conv.kernel_size[0], conv.stride[0], x.shape[-1]
    pad = max((-(-n // s) - 1) * s + k - n, 0)
    return conv(F.pad(x, (pad // 2, pad - pad // 2)))


class SignalEncoder(nn.Module):
    def __init__(self, length, in_channels, patch, channels, d, trunk):
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv1d(in_channels, channels // 2, 9)
        self.conv2 = nn.Conv1d(channels // 2, channels, 9, stride=5)
        self.conv3 = nn.Conv1d(channels, d, 3 * (patch // 5), stride=patch // 5)
        self.trunk = Trunk(length // patch, d, **trunk)

    def forward(self, inp):
        p = self.patch
        t = (inp["values"].shape[1] // p) * p
        time_mask = inp["mask"][:, :t]
        x = torch.where(time_mask[..., None], inp["values"][:, :t], 0.0).transpose(1, 2)  # [B, C, T]
        x = _gelu(_same_conv(self.conv1, x))
        x = _gelu(_same_conv(self.conv2, x))
        tokens = _same_conv(self.conv3, x).transpose(1, 2)
        mask = time_mask.reshape(time_mask.shape[0], -1, p).any(-1) & inp["present"][:, None]
        return self.trunk(tokens, mask), mask


class CrossAttentionLayer(nn.Module):
    def __init__(self, d, heads, ratio, sdpa, cross_gate):
        super().__init__()
        self.ln_cross, self.ln_self, self.ln_mlp = _layer_norm(d), _layer_norm(d), _layer_norm(d)
        self.cross_attn = Attention(d, heads, sdpa)
        self.self_attn = Attention(d, heads, sdpa)  # one projection, shared by all modalities, as in mmjax
        self.mlp = MLP(d, ratio * d)
        # ReZero-style gate on the cross-modal branch, starting closed (mmjax's `cross_gate`)
        self.gate = nn.Parameter(torch.zeros(())) if cross_gate else None

    def forward(self, x, pair_mask, cross_mask, bounds):
        h = self.cross_attn(self.ln_cross(x), cross_mask)
        x = x + (h * self.gate if self.gate is not None else h)
        x = x + self.self_attn(self.ln_self(x), pair_mask, segments=bounds)
        return x + self.mlp(self.ln_mlp(x))


class CrossAttentionFusion(nn.Module):
    def __init__(self, token_counts, d, depth, heads, ratio, sdpa, skip=True, cross_gate=True):
        super().__init__()
        m, summary = len(token_counts), (2 if skip else 1) * d
        self.skip = skip  # each modality's pooled encoder output beside its attended summary
        self.modality_embedding = nn.Parameter(torch.zeros(m, d))
        self.missing_embedding = nn.Parameter(torch.zeros(m, summary))
        self.layers = nn.ModuleList(CrossAttentionLayer(d, heads, ratio, sdpa, cross_gate) for _ in range(depth))
        self.norm = _layer_norm(d)
        self.mix = nn.Linear(m * summary, d)
        seg = np.concatenate([np.full(n, i) for i, n in enumerate(token_counts)])
        self.register_buffer("seg", torch.as_tensor(seg))
        self.register_buffer("other", torch.as_tensor(seg[:, None] != seg[None, :]))
        self.bounds = tuple(int(b) for b in np.cumsum([0, *token_counts]))

    def forward(self, tokens, masks):
        x = torch.cat(tokens, dim=1) + self.modality_embedding[self.seg]
        valid = torch.cat(masks, dim=1)
        pair_mask = valid[:, :, None] & valid[:, None, :]
        cross_mask = pair_mask & self.other
        for layer in self.layers:
            x = layer(x, pair_mask, cross_mask, self.bounds)
        x = self.norm(x)
        b = self.bounds
        pooled = torch.stack([masked_mean(x[:, b[i]:b[i + 1]], m) for i, m in enumerate(masks)], dim=1)
        if self.skip:
            before = torch.stack([masked_mean(t, m) for t, m in zip(tokens, masks)], dim=1)
            pooled = torch.cat([before, pooled], dim=-1)
        present = torch.stack([m.any(-1) for m in masks], dim=1)
        summary = torch.where(present[..., None], pooled, self.missing_embedding)
        fused = _gelu(self.mix(summary.flatten(1)))
        return fused[:, None], present.any(1, keepdim=True)


class TaskHeads(nn.Module):
    def __init__(self, tasks, k, d):
        super().__init__()
        self.tasks = tasks
        for t in tasks:
            self.register_parameter(f"{t.name}_kernel", nn.Parameter(torch.zeros(k, d, t.num_outputs)))
            self.register_parameter(f"{t.name}_bias", nn.Parameter(torch.zeros(k, t.num_outputs)))

    def forward(self, fused, fused_mask, average=True):
        w = fused_mask.float()
        w = w / w.sum(1, keepdim=True).clamp(min=1.0)
        out = {}
        for t in self.tasks:
            logits = torch.einsum("bkd,kdo->bko", fused, getattr(self, f"{t.name}_kernel")) + getattr(
                self, f"{t.name}_bias")
            if average:
                logits = torch.einsum("bko,bk->bo", logits, w)
            if t.kind == "regression":
                logits = t.target_mean + t.target_std * logits
            out[t.name] = logits if t.kind == "multilabel" else logits[..., 0]
        return out


def drop_modalities(present, rate):
    """mmjax.models.model.drop_modalities with torch's RNG: never drops all of a patient's modalities."""
    keep = present & (torch.rand(present.shape) >= rate)
    pick = torch.where(present, torch.rand(present.shape), -1.0).argmax(1)
    one = (torch.arange(present.shape[1])[None] == pick[:, None]) & present
    return torch.where(keep.any(1, keepdim=True), keep, one)


class MultimodalModel(nn.Module):
    """The default experiment's model: four encoders, cross-attention fusion, task heads and the
    per-modality auxiliary heads. Built from the mmjax config and one batch (for the shapes)."""

    def __init__(self, flax_model, batch, sdpa=False):
        super().__init__()
        fm, d = flax_model, flax_model.width
        if fm.fusion != "cross_attention" or not fm.modality_heads or fm.uncertainty_weighting:
            raise ValueError("the PyTorch port covers the default model: cross_attention fusion with "
                             "modality heads, fixed task weights")
        settings = [dict(fm.encoders[m]) for m in fm.modalities] + [dict(fm.fusion_kwargs or {})]
        if jnp.dtype(fm.dtype) != jnp.float32 or any(kw.get("dropout", 0.0) for kw in settings) or any(
                kw.get("name", m) != m for kw, m in zip(settings, fm.modalities)):
            raise ValueError("the PyTorch port covers float32, no dropout and the built-in encoders")
        self.modalities, self.tasks, self.modality_dropout = list(fm.modalities), fm.tasks, fm.modality_dropout
        enc = {}
        for mod in self.modalities:
            kw = dict(fm.encoders[mod])
            tr = dict(depth=kw.get("depth", 1), heads=kw.get("num_heads", 4), ratio=kw.get("mlp_ratio", 2), sdpa=sdpa)
            shape = batch[mod]["values"].shape
            if mod == "image":
                enc[mod] = ImageEncoder(shape[1:], kw.get("patch_size", 8), d, tr)
            elif mod == "text":
                enc[mod] = TextEncoder(shape[1], kw["vocab_size"], d, tr)
            elif mod == "tabular":
                enc[mod] = TabularEncoder(shape[1], d, tr)
            else:
                if not kw.get("conv", True):
                    raise ValueError("the PyTorch port covers the conv signal tokenizer only")
                enc[mod] = SignalEncoder(shape[1], shape[2], kw.get("patch_size", 50), kw.get("channels", 32), d, tr)
            self.add_module(f"{mod}_encoder", enc[mod])
        self.encoders = enc
        counts = [enc[mod].trunk.pos_embedding.shape[0] for mod in self.modalities]  # tokens per modality
        fk = dict(fm.fusion_kwargs or {})
        self.fusion = CrossAttentionFusion(counts, d, fk.get("depth", 2), fk.get("num_heads", 4),
                                           fk.get("mlp_ratio", 2), sdpa, fk.get("skip", True),
                                           fk.get("cross_gate", True))
        self.heads = TaskHeads(self.tasks, 1, d)
        self.modality_heads = TaskHeads(self.tasks, len(self.modalities), d)

    def forward(self, batch, train=False):
        present = torch.stack([batch[mod]["present"] for mod in self.modalities], dim=1)
        if train and self.modality_dropout > 0:
            present = drop_modalities(present, self.modality_dropout)
        tokens, masks = [], []
        for i, mod in enumerate(self.modalities):
            t, mk = self.encoders[mod](dict(batch[mod], present=present[:, i]))
            tokens.append(t)
            masks.append(mk)
        fused, fused_mask = self.fusion(tokens, masks)
        outputs = self.heads(fused, fused_mask)
        pooled = torch.stack([masked_mean(t, mk) for t, mk in zip(tokens, masks)], dim=1)
        has = torch.stack([mk.any(-1) for mk in masks], dim=1)
        return outputs, self.modality_heads(pooled, has, average=False), has


def _masked_mean_loss(t, pred, y, mask):
    y = y.expand_as(pred)
    if t.kind == "regression":
        per = ((pred - y) / t.target_std) ** 2
    else:
        per = F.binary_cross_entropy_with_logits(pred, y, reduction="none")
    return torch.where(mask, per, 0.0).sum() / mask.sum().clamp(min=1).float()


def joint_loss(model_out, batch, tasks, weights, modality_heads_weight):
    """mmjax.losses: weighted masked task losses plus the weighted auxiliary per-modality losses."""
    outputs, mod_outputs, has = model_out
    rows = batch["example_mask"]
    total, per_task = 0.0, {}
    for t in tasks:
        known = batch["label_mask"][t.name] & (rows[:, None] if t.kind == "multilabel" else rows)
        y = batch["labels"][t.name]
        per_task[t.name] = _masked_mean_loss(t, outputs[t.name], y, known)
        present = has[..., None] if t.kind == "multilabel" else has
        aux = _masked_mean_loss(t, mod_outputs[t.name], y[:, None], known[:, None] & present)
        w = weights.get(t.name, 1.0)
        total = total + w * per_task[t.name] + modality_heads_weight * w * aux
    return total, per_task


def _to_torch(tree):
    if isinstance(tree, dict):
        return {k: _to_torch(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iu" else a.copy())


def to_torch(batch):
    """A host batch (numpy) as torch tensors (ids as int64, the patient id dropped)."""
    return _to_torch({k: v for k, v in batch.items() if k != "patient_id"})


def torch_name(path):
    """A flax parameter path -> the torch parameter name of the same array."""
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] == "kernel":
        keys[-1] = "weight"
    elif keys[-1] == "scale" or keys[-2:] == ["embedding", "embedding"]:
        keys[-1] = "weight"
    name = ".".join(keys)
    for prefix in ("trunk.block", "fusion.layer"):
        head, sep, rest = name.partition(prefix)
        if sep:  # flax block0 / layer0 -> torch ModuleList blocks.0 / layers.0
            num, _, tail = rest.partition(".")
            name = f"{head}{prefix.split('.')[0]}.{prefix.split('.')[1]}s.{num}.{tail}"
    return name


def swap_layout(model: nn.Module, name: str, a):
    """Parameter `name`'s array between the flax and the torch layout (the swap is its own inverse)."""
    if name.endswith(".weight"):
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, nn.Linear):
            return a.T  # Dense kernel [in, out] <-> Linear weight [out, in]
        if isinstance(owner, nn.Conv1d):
            return a.transpose(2, 1, 0)  # Conv kernel [k, in, out] <-> Conv1d weight [out, in, k]
    return a


def load_flax_params(model: nn.Module, params) -> dict:
    """Copies a flax parameter tree into `model`; returns {torch name: flax path}. Every parameter
    on both sides must be matched."""
    import jax

    own = dict(model.named_parameters())
    names = {}
    with torch.no_grad():
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = torch_name(path)
            if name not in own:
                raise KeyError(f"flax parameter {jax.tree_util.keystr(path)} has no torch counterpart {name!r}")
            a = swap_layout(model, name, np.asarray(leaf))
            if tuple(own[name].shape) != a.shape:
                raise ValueError(f"{name}: torch {tuple(own[name].shape)} vs flax {a.shape}")
            own[name].copy_(torch.from_numpy(np.array(a)))
            names[name] = path
    missing = set(own) - set(names)
    if missing:
        raise KeyError(f"torch parameters without a flax counterpart: {sorted(missing)}")
    return names


def check_equivalence(s, net) -> dict:
    """With modality dropout off, mmjax and this port agree on outputs, losses and gradients (asserted);
    `s`: a `mmjax.benchmarks.train_step.StepSetup`, `net` loaded with its initial parameters
    (`load_flax_params`). Returns both losses and the largest gradient error, relative to each
    parameter's largest gradient entry."""
    import jax

    from mmjax.training.step import make_loss_fn

    model = s.model.clone(modality_dropout=0.0)
    weights = s.loss_weights
    loss_fn = make_loss_fn(model, s.tasks, weights, modality_heads_weight=s.config.loss.modality_heads_weight)
    (loss, per_task), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        s.state.params, s.batch, jax.random.PRNGKey(0))
    outputs, _ = jax.jit(lambda p, b: model.apply({"params": p}, b))(s.state.params, s.batch)

    tb = to_torch(s.host_batch)
    before, net.modality_dropout = net.modality_dropout, 0.0
    net.zero_grad(set_to_none=True)
    out = net(tb, train=True)
    t_loss, t_per_task = joint_loss(out, tb, s.tasks, weights, s.config.loss.modality_heads_weight)
    t_loss.backward()
    net.modality_dropout = before

    report = {"loss_jax": float(loss), "loss_torch": t_loss.item()}
    np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-5)
    for t in s.tasks:
        np.testing.assert_allclose(out[0][t.name].detach().numpy(), np.asarray(outputs[t.name]), rtol=1e-4,
                                   atol=1e-5, err_msg=f"outputs[{t.name}]")
        np.testing.assert_allclose(t_per_task[t.name].item(), float(per_task[t.name]), rtol=1e-5)
    flat = {torch_name(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    worst = 0.0
    for name, p in net.named_parameters():
        g = swap_layout(net, name, p.grad.numpy())
        scale = max(np.abs(flat[name]).max(), 1e-6)
        err = float(np.abs(g - flat[name]).max() / scale)
        if err > 1e-3:
            raise AssertionError(f"gradient of {name} differs: max error {err:.2e} of its largest entry")
        worst = max(worst, err)
    report["max_grad_rel_error"] = worst
    return report
