"""Models: per-modality encoders, fusion methods and the multimodal model (flax.linen).

Needs only jax, flax and einops: usable and benchmarkable without the data stack. This package's
`__init__` imports nothing, so that `mmjax.models.settings` (the registered settings, read without
jax) can be imported by a config file; import what you use from its modules:

    from mmjax.models.build import build_model
    from mmjax.models.fusion import FUSIONS
    from mmjax.models.encoders import ENCODERS
    from mmjax.models.model import MultimodalModel
"""
