"""cmfl_jax: Cross-Modality Deep Feature Learning for brain tumour segmentation in JAX/Flax."""

__version__ = "0.1.0"
