"""An MLP tabular encoder (`mlp`): all columns in one vector, one token out."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase, category_embeddings
from mmjax.models.layers import Dense, LayerNorm


@ENCODERS.register("mlp")
class MLPEncoder(EncoderBase):
    """The MLP baseline of tabular deep learning (Gorishniy et al., 2021, "Revisiting deep learning
    models for tabular data"), with missing values encoded as in Lipton et al., 2016 (a value
    and an indicator per column).

    Input vector: each numeric column's value where observed and 0 where not (`x * observed`),
    each column's observed indicator (0/1), and a learned `embedding_dim` embedding per
    categorical column (`category_sizes[g]` rows as in the `tabular` encoder: 0 missing, 1 unseen
    in training, 2 + k the k-th training category). Then `layers` of Dense(`hidden`), GELU and
    dropout, and a Dense to `width`, layer-normalized: ONE token [B, 1, width]. An unobserved
    value never enters (its content is ignored exactly, NaN included). The token mask is the
    presence flag; an absent table's token is zero. `depth` and `num_heads` are unused.
    """

    kind = "tabular"

    category_sizes: tuple[int, ...] = ()
    hidden: int = 256
    layers: int = 2
    embedding_dim: int = 8

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, observed = inputs["values"], inputs["mask"]  # [B, F]
        parts = [jnp.where(observed, x, 0).astype(jnp.float32), observed.astype(jnp.float32)]
        if self.category_sizes:
            emb = category_embeddings(self, inputs["categories"], self.category_sizes, self.embedding_dim)
            parts.append(emb.reshape(emb.shape[0], -1))  # [B, G * embedding_dim]
        h = jnp.concatenate(parts, axis=-1).astype(self.dtype)
        for i in range(self.layers):
            h = nn.gelu(Dense(self.hidden, dtype=self.dtype, name=f"fc{i}")(h))
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        token = LayerNorm(name="norm")(Dense(self.width, dtype=self.dtype, name="token_projection")(h))
        mask = jnp.asarray(inputs["present"])[:, None]  # [B, 1]
        return jnp.where(mask[..., None], token[:, None], 0).astype(self.dtype), mask
