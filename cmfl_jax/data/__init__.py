"""Data layer: BraTS layouts, NIfTI loading, pre-processing, cache, grain pipeline, phantom."""
