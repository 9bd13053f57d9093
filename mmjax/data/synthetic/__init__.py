"""The embedded `synthetic_patients` dataset: a latent patient model and its TFDS builder."""

from mmjax.data.synthetic.builder import TASKS, SyntheticPatients, SyntheticPatientsConfig

__all__ = ["TASKS", "SyntheticPatients", "SyntheticPatientsConfig"]
