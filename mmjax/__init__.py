"""mmjax: multimodal learning for medical diagnosis in JAX."""

__version__ = "0.1.0"
