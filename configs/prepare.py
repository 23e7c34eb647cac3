"""Scan a data root, validate every subject, build the cache and print a summary table.

  python -m cmfl_jax.main --config=configs/prepare.py --workdir=runs/prepare \
      --config.data.root=/data/BraTS2018/Training
Without a root it generates (once) and prepares the built-in synthetic data set.
"""

from cmfl_jax.config_defaults import data_config


def get_config(arg: str | None = None):
    import ml_collections

    config = ml_collections.ConfigDict()
    config.job = "prepare"
    config.data = data_config()
    if arg == "smoke":
        config.data.synthetic.n = 4
        config.data.synthetic.shape = (48, 48, 48)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/prepare.py (known: smoke)")
    return config
