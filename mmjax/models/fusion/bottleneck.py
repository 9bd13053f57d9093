"""`bottleneck`: multimodal bottleneck Transformer (Nagrani et al., 2021, "Attention bottlenecks for
multimodal fusion", MBT).

Each modality has its own Transformer layers. Layers before `fusion_layer` see only their own
modality's tokens; from `fusion_layer` on, each modality's layer attends over its tokens plus
`num_bottlenecks` shared bottleneck tokens, and the bottleneck tokens' updates are averaged over
the modalities, so modalities exchange information only through those few tokens. The fused
representation mixes each modality's pooled tokens (a learned placeholder for an absent one) and
the mean bottleneck token.

An absent modality's tokens are masked keys (softmax weight exactly 0) and its update of the
bottleneck is left out of the average over modalities (the average runs over present ones), so
its content never enters.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.fusion import FUSIONS
from mmjax.models.fusion._common import FusionBase, embeddings, mean_over_present, pool, stack_padded, with_placeholder
from mmjax.models.layers import Dense, LayerNorm, TransformerBlock


@FUSIONS.register("bottleneck")
class BottleneckFusion(FusionBase):
    num_bottlenecks: int = 4
    fusion_layer: int = 1  # layers [0, fusion_layer) are unimodal; [fusion_layer, depth) exchange

    @nn.compact
    def __call__(self, tokens, masks, train: bool = False):
        names = list(tokens)
        if not 0 <= self.fusion_layer <= self.depth:
            raise ValueError(f"bottleneck fusion_layer={self.fusion_layer} must be within [0, depth={self.depth}]")
        b = next(iter(tokens.values())).shape[0]
        # All modalities at once: tokens padded to T (padding masked), one Transformer layer per
        # modality applied as a batch over the modality axis with per-modality weights (nn.vmap).
        x, valid = stack_padded(tokens, masks)  # [M, B, T, D], [M, B, T]
        t = x.shape[2]
        present = jnp.any(valid, axis=-1).T  # [B, M]
        btl = self.param("bottleneck_tokens", nn.initializers.normal(0.02), (self.num_bottlenecks, self.width),
                         jnp.float32)
        btl = jnp.broadcast_to(btl.astype(self.dtype), (b,) + btl.shape)  # [B, N, D]
        with_btl = jnp.concatenate([valid, jnp.ones((len(names), b, self.num_bottlenecks), bool)], axis=-1)
        per_modality = nn.vmap(TransformerBlock, variable_axes={"params": 0},
                               split_rngs={"params": True, "dropout": True}, in_axes=(0, 0, None))
        for i in range(self.depth):
            block = per_modality(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"layer{i}")
            if i < self.fusion_layer:
                x = block(x, valid, train)
                continue
            shared = jnp.broadcast_to(btl, (len(names),) + btl.shape)
            out = block(jnp.concatenate([x, shared], axis=2), with_btl, train)
            x, updates = out[:, :, :t], out[:, :, t:]  # updates: [M, B, N, D]
            # The bottleneck tokens: the average of the present modalities' updates.
            new = mean_over_present(jnp.moveaxis(updates, 0, 1), present)
            btl = jnp.where(jnp.any(present, axis=1)[:, None, None], new, btl)
        x = nn.vmap(LayerNorm, variable_axes={"params": 0}, split_rngs={"params": True})(name="norm")(x)
        x = {m: x[i, :, :tokens[m].shape[1]].astype(self.dtype) for i, m in enumerate(names)}
        pooled, present = pool(x, masks)
        summary = with_placeholder(self, pooled, present).reshape(b, -1)
        summary = jnp.concatenate([summary, jnp.mean(btl, axis=1)], axis=-1)
        fused = nn.gelu(Dense(self.width, dtype=self.dtype, name="mix")(summary))
        return fused[:, None], jnp.any(present, axis=1, keepdims=True), {"embeddings": embeddings(names, pooled)}
