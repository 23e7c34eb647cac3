"""Data layer: BraTS layouts, NIfTI loading, pre-processing, cache, grain pipeline (phantoms: cmfl_jax.synthetic)."""
