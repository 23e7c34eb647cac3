"""The stable public name of the synthetic data set: ``cmfl_jax.data.phantom.make_subject`` and ``write_dataset``.

The simulator lives in :mod:`cmfl_jax.synthetic` (dataset creation apart from data loading); these names are
kept here so that code written against this path keeps working. ``python -m cmfl_jax.data.phantom`` still runs
the writer's command line, now ``python -m cmfl_jax.synthetic``.
"""

import sys

from cmfl_jax.synthetic import (
    BRATS_SHAPE,
    LGG_FRACTION,
    Phantom,
    brats_affine,
    grade_of_seed,
    make_subject,
    subject_seed,
    write_dataset,
)
from cmfl_jax.synthetic.cli import main

__all__ = [
    "BRATS_SHAPE",
    "LGG_FRACTION",
    "Phantom",
    "brats_affine",
    "grade_of_seed",
    "main",
    "make_subject",
    "subject_seed",
    "write_dataset",
]

if __name__ == "__main__":
    sys.exit(main())
