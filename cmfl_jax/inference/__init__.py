"""Whole-volume prediction: sliding windows, the predictor of a CMFF workdir or bundle, the bundle writer, and a
bundle's StableHLO run with JAX alone (stablehlo.py: no model code)."""
