"""The default text encoder (`text`): a Transformer over token embeddings."""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase


@ENCODERS.register("text")
class TextEncoder(EncoderBase):
    """Token embedding and a Transformer over the token mask."""

    kind = "text"

    vocab_size: int = 1000

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        ids = inputs["values"]  # [B, L]
        emb = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embedding")
        mask = inputs["mask"] & inputs["present"][:, None]
        return self.trunk(emb(ids).astype(self.dtype), mask, train), mask
