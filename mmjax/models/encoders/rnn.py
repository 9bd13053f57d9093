"""A recurrent text encoder (`rnn`): token embedding and a stacked bidirectional GRU or LSTM."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.encoders._common import EncoderBase
from mmjax.models.layers import Dense, LayerNorm

GATES = {"gru": 3, "lstm": 4}


def _orthogonal_per_gate(gates):
    """The recurrent kernel [H, gates * H]: one orthogonal [H, H] block per gate (as flax's cells)."""

    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, gates)
        return jnp.concatenate([nn.initializers.orthogonal()(k, (shape[0], shape[0]), dtype) for k in keys], -1)

    return init


class ProjectedCell(nn.RNNCellBase):
    """One GRU or LSTM step whose input is already projected to the gates ([B, gates * H], computed
    for every step at once before the scan); the recurrent projection is one [H, gates * H] matmul.
    The same equations as `nn.GRUCell` and `nn.OptimizedLSTMCell`; the state is kept in float32."""

    cell: str
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, projected):
        h = carry if self.cell == "gru" else carry[1]
        gates = GATES[self.cell]
        recurrent = Dense(gates * self.features, use_bias=self.cell == "gru", dtype=self.dtype,
                          kernel_init=_orthogonal_per_gate(gates), name="recurrent")(h.astype(self.dtype))
        projected, recurrent = projected.astype(jnp.float32), recurrent.astype(jnp.float32)
        if self.cell == "gru":
            xr, xz, xn = jnp.split(projected, 3, axis=-1)
            hr, hz, hn = jnp.split(recurrent, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            h = (1.0 - z) * jnp.tanh(xn + r * hn) + z * h
            return h, h
        i, f, g, o = jnp.split(projected + recurrent, 4, axis=-1)
        c = jax.nn.sigmoid(f) * carry[0] + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    def initialize_carry(self, rng, input_shape):
        h = jnp.zeros((*input_shape[:-1], self.features), jnp.float32)
        return h if self.cell == "gru" else (h, h)

    @property
    def num_feature_axes(self) -> int:
        return 1


class Recurrence(nn.Module):
    """One direction of one layer: x [B, L, D] -> [B, L, H], reading steps < lengths[b] only."""

    cell: str
    features: int
    reverse: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, lengths):
        projected = Dense(GATES[self.cell] * self.features, dtype=self.dtype, name="input")(x)  # one flat GEMM
        rnn = nn.RNN(ProjectedCell(self.cell, self.features, self.dtype, name="cell"), reverse=self.reverse,
                     keep_order=True)
        return rnn(projected, seq_lengths=lengths).astype(self.dtype)


@ENCODERS.register("rnn")
class RNNEncoder(EncoderBase):
    """Token embedding, then `layers` bidirectional recurrent layers (`cell`: "gru", Cho et al.,
    2014, or "lstm", Hochreiter & Schmidhuber, 1997; bidirectional as in Schuster & Paliwal, 1997)
    of `hidden` units per direction; each token's two directions concatenated, projected to
    `width` and layer-normalized are its output token.

    The token mask is the batch's text mask & present. The valid tokens are moved to the front of
    their row (in order) and `nn.RNN` runs with `seq_lengths` = their count, so the backward
    direction starts at the last valid token and no valid token's state ever reads padding (nor
    padding's content or length, nor a gap inside the mask); the outputs are moved back to their
    positions and zeroed where the mask is False. `depth` and `num_heads` are unused.
    """

    kind = "text"

    vocab_size: int = 1000
    cell: str = "gru"
    hidden: int = 128
    layers: int = 1

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        ids = inputs["values"]  # [B, L]
        mask = inputs["mask"] & inputs["present"][:, None]
        if self.cell not in GATES:
            raise ValueError(f"rnn cell={self.cell!r}; use one of {sorted(GATES)}")
        order = jnp.argsort(~mask, axis=1, stable=True)  # valid tokens first, in order
        valid = jnp.take_along_axis(mask, order, axis=1)
        lengths = jnp.sum(valid, axis=1)
        emb = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embedding")
        # embedded in the input's order, then reordered: the embedding output lines up with the tokens
        # (what integrated gradients on text intercept)
        x = jnp.take_along_axis(emb(ids).astype(self.dtype), order[..., None], axis=1)
        x = jnp.where(valid[..., None], x, 0)
        for i in range(self.layers):
            if i:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = jnp.concatenate([
                Recurrence(self.cell, self.hidden, reverse, self.dtype, name=f"layer{i}_{d}")(x, lengths)
                for d, reverse in (("forward", False), ("backward", True))], axis=-1)
        x = LayerNorm(name="norm")(Dense(self.width, dtype=self.dtype, name="token_projection")(x))
        x = jnp.take_along_axis(x, jnp.argsort(order, axis=1)[..., None], axis=1)  # back to the input's positions
        return jnp.where(mask[..., None], x, 0).astype(self.dtype), mask
