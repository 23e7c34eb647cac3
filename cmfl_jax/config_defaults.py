"""Config blocks shared by the job configs in ``configs/`` (one definition, many jobs)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    """Where the data is and how it is pre-processed and sampled.

    ``root`` empty means the built-in synthetic data set (``synthetic.*``), generated once
    under the cache folder and reused.
    """
    return ml_collections.ConfigDict(
        {
            "root": "",  # a folder of BraTS subjects, or a CSV of the explicit layout
            "cache_dir": "",  # "" -> $CMFL_JAX_CACHE or ~/.cache/cmfl_jax
            "normalization": "zscore_brain",  # or "none"
            "require_labels": True,
            "synthetic": {"n": 10, "shape": (240, 240, 155), "layout": "brats2018", "seed": 0},
            "patch_size": (128, 128, 128),
            "tumour_prob": 1.0,  # probability that a patch centre is a tumour voxel (1.0: the paper)
            "flip": False,
            "num_workers": 0,
        }
    )
