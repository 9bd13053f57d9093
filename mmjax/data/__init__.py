"""Datasets and the Grain input pipeline. Importing this registers `synthetic_patients` with TFDS."""

from mmjax.data import synthetic  # noqa: F401  (registers the TFDS builder)
