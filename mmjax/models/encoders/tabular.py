"""The default tabular encoder (`tabular`): the FT-Transformer feature tokenizer."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase, category_embeddings


@ENCODERS.register("tabular")
class TabularEncoder(EncoderBase):
    """Feature tokenizer (FT-Transformer), one token per column, then a Transformer across them.

    Numeric column f: token = x_f * w_f + b_f, or a learned embedding when the value is missing.
    Categorical column g: a learned embedding per training category, plus one for a missing value
    (index 0) and one for a category never seen in training (index 1); `category_sizes[g]` rows.
    """

    kind = "tabular"

    category_sizes: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        x, observed = inputs["values"], inputs["mask"]  # [B, F]
        b, f = x.shape
        init = nn.initializers.normal(0.02)
        parts = []
        if f:
            w = self.param("feature_weight", init, (f, self.width), jnp.float32)
            bias = self.param("feature_bias", init, (f, self.width), jnp.float32)
            missing = self.param("missing_embedding", init, (f, self.width), jnp.float32)
            parts.append(jnp.where(observed[..., None], jnp.where(observed, x, 0)[..., None] * w + bias, missing))
        if self.category_sizes:
            parts.append(category_embeddings(self, inputs["categories"], self.category_sizes, self.width))
        tokens = jnp.concatenate(parts, axis=1).astype(self.dtype)
        mask = jnp.broadcast_to(inputs["present"][:, None], tokens.shape[:2])
        return self.trunk(tokens, mask, train), mask
