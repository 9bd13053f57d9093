"""One encoder per modality, one contract for all of them, one file each.

    tokens [B, T, D], token_mask bool [B, T] = encoder(inputs, train=...)

`inputs` is that modality's entry of the batch (`mmjax/batch.py`): `values`, `present` and, for
sequences, `mask`. The token mask is False for every token of an absent modality; the tokens of
an absent modality are zeroed, but correctness never relies on that: fusion uses the mask.

Each modality kind has a default encoder registered under the kind's name (`image`, `text`,
`tabular`, `signal`); `config.model.<kind>.encoder` names another encoder of that kind.

Adding an encoder: one file in this folder with a `flax.linen` module decorated
`@ENCODERS.register("name")`, subclassing `EncoderBase` with `kind = "<kind>"` (it receives
`width`, `depth`, `num_heads`, `mlp_ratio`, `dropout`, `dtype` and its own fields from
`config.model.<kind>`). The registry imports every module here; `tests/test_encoders.py` runs the
contract test on every registered encoder.
"""

from mmjax.models.registry import Registry, import_modules

ENCODERS = Registry("encoder")

import_modules(__name__, __path__)
