"""Fusion methods behind one contract, one file each, chosen by name from `FUSIONS`.

    fused [B, K, D], fused_mask bool [B, K], aux = fusion(tokens, masks, train=...)

`tokens` maps each modality to its encoder's `[B, T_m, D]` tokens and `masks` to its `[B, T_m]`
token mask; a modality is absent for a patient when its mask row is all False. Any number of
modalities (1 to 6 are tested). `K` is 1 for methods that produce one representation; decision
fusion (`late`, `weighted_late`) returns one per modality (`K = M`) and the model averages the
heads' logits over `fused_mask`, or with the weights `aux['fused_weights']` [B, K] when the fusion
gives them. `aux['embeddings']` holds the pooled per-modality embeddings `[B, D]`; attention
fusions add `aux['attention']` (a list of weight arrays; for `cross_attention` `[B, heads, T, T]`
over the concatenated tokens, `aux['token_modality']` [T] giving each token's modality index).

Every method excludes an absent modality exactly: its content never changes an output bit (the
shared test in `tests/test_fusion.py` sets it to noise and compares). Each file's docstring says how.

Adding a fusion: one file in this folder with a `flax.linen` module decorated
`@FUSIONS.register("name")`, subclassing `FusionBase` (it receives `width`, `num_heads`, `depth`,
`mlp_ratio`, `dropout`, `dtype` and its own fields from `config.model.fusion`). The registry
imports every module here, and `tests/test_fusion.py` runs every registered name.
"""

from mmjax.models.registry import Registry, import_modules

FUSIONS = Registry("fusion")

import_modules(__name__, __path__)
