"""`pairwise_cross`: directional pairwise cross-modal Transformers (Tsai et al., 2019, "Multimodal
Transformer for unaligned multimodal language sequences", MulT).

For every ordered pair (source n -> target m), `depth` cross-modal layers let the target's tokens
attend to the source's (queries from m, keys and values from n), each pair with its own weights:
M (M - 1) streams. Each target concatenates its streams feature-wise, projects them back to the
width and runs one self-attention block; its pooled tokens are its summary, and the summaries
(a learned placeholder for an absent target) are concatenated and mixed. With one modality there
is no pair and the target's own tokens go straight to the self-attention block.

An absent source's tokens are masked keys (weight exactly 0: the stream passes the target's own
tokens through), an absent target's summary slot holds the placeholder, so an absent modality's
content never enters. Cost grows as M^2: 30 streams at 6 modalities.
"""

from __future__ import annotations

import einops
import flax.linen as nn
import numpy as np

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, pool, stack_padded, summarize
from mmjax.models.layers import MLP, Dense, Dtype, LayerNorm, MultiHeadAttention, TransformerBlock


class CrossModalLayer(nn.Module):
    """Pre-norm: the target's tokens attend to the source's, then an MLP. x [B, Tm, D], ctx [B, Tn, D]."""

    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, ctx, mask, train):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            LayerNorm(name="ln_q")(x).astype(self.dtype), mask, context=LayerNorm(name="ln_kv")(ctx).astype(self.dtype))
        x = x + drop(h)
        h = LayerNorm(name="ln_mlp")(x).astype(self.dtype)
        h = MLP(self.mlp_ratio * x.shape[-1], dtype=self.dtype, name="mlp")(h)
        return x + drop(h)


def _stacked(module_cls, in_axes=0):
    """`module_cls` with its own parameters for each entry of a leading axis (pairs or targets)."""
    return nn.vmap(module_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, out_axes=0)


@FUSIONS.register("pairwise_cross")
class PairwiseCrossFusion(FusionBase):
    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        names = list(tokens)
        m = len(names)
        x, valid = stack_padded(tokens, masks)  # [M, B, T, D], [M, B, T]
        if m > 1:
            # All M (M - 1) directed pairs at once: one batched computation, weights per pair (nn.vmap),
            # so the cost of compiling does not grow with the number of pairs.
            pairs = np.array([(a, b) for a in range(m) for b in range(m) if a != b])  # (target, source)
            target, source = pairs[:, 0], pairs[:, 1]
            stream = x[target]
            pair_mask = valid[target][:, :, :, None] & valid[source][:, :, None, :]  # [P, B, T, T]
            for i in range(self.depth):
                stream = _stacked(CrossModalLayer, (0, 0, 0, None))(
                    self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"cross_layer{i}")(
                    stream, x[source], pair_mask, train)
            streams = einops.rearrange(stream, "(m s) b t d -> m b t (s d)", m=m)  # a target's streams side by side
            x = _stacked(Dense)(self.width, dtype=self.dtype, name="merge")(streams)
        x = _stacked(TransformerBlock, (0, 0, None))(self.num_heads, self.mlp_ratio, self.dropout, self.dtype,
                                               name="self_block")(x, valid, train)
        x = _stacked(LayerNorm)(name="norm")(x).astype(self.dtype)
        per_mod = {k: x[i, :, :tokens[k].shape[1]] for i, k in enumerate(names)}
        pooled, present = pool(per_mod, masks)
        fused, fused_mask = summarize(self, pooled, present, self.dtype)
        return fused, fused_mask, {"embeddings": embeddings(names, pooled)}
