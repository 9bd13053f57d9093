"""Models: per-modality encoders, fusion methods and the multimodal model (flax.linen).

Needs only jax, flax and einops: usable and benchmarkable without the data stack.
"""

from mmjax.models.build import build_model
from mmjax.models.encoders import ENCODERS
from mmjax.models.fusion import FUSIONS
from mmjax.models.model import MultimodalModel, TaskHeads, drop_modalities

__all__ = ["build_model", "ENCODERS", "FUSIONS", "MultimodalModel", "TaskHeads", "drop_modalities"]
