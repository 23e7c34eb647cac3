"""The stable public name of the synthetic data set: ``cmfl_jax.data.phantom.make_subject`` and ``write_dataset``.

The simulator lives in :mod:`cmfl_jax.synthetic` (dataset creation apart from data loading); these names are
kept here so that code written against this path keeps working. ``python -m cmfl_jax.data.phantom`` still runs
the writer's command line, now ``python -m cmfl_jax.synthetic``.
"""

import sys

from cmfl_jax import synthetic
from cmfl_jax.synthetic import *  # noqa: F403  (the names of synthetic.__all__)
from cmfl_jax.synthetic.cli import main

__all__ = [*synthetic.__all__, "main"]

if __name__ == "__main__":
    sys.exit(main())
