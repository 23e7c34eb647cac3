"""``python -m cmfl_jax.synthetic``: the data set writer's command line (:mod:`cmfl_jax.synthetic.cli`)."""

import sys

from cmfl_jax.synthetic.cli import main

sys.exit(main())
