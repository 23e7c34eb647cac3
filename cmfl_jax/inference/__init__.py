"""Whole-volume prediction: sliding windows, the predictor of a CMFF workdir or bundle, and the bundle."""
