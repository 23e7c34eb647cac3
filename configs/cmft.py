"""Phase 1, CMFT: the CycleGAN between the modality pairs (section 3.1).

  python -m cmfl_jax.main --config=configs/cmft.py --workdir=runs/cmft [--config.data.root=/data/BraTS2018]
Variants (they combine with ``key=value`` parts: ``configs/cmft.py:cpu,train.steps=100``):
``configs/cmft.py:smoke`` (tests and CI: 32^3, base 4, depth 2), ``:cpu`` (the CPU demonstration that
``configs/cmff.py:cpu`` starts from), ``:cpu64`` (the paper's U-Net at 64^3, a CPU run),
``:full`` (the paper's sizes, the same as the default: 128^3 patches, base 16, depth 4; 20000 steps is this project's
choice, the paper gives only 18 h 57 min of training; a GPU/TPU job), ``--config.cmft.objective=self`` (Ours_self),
``--config.data.pairing=t1-flair/t2-t1ce``.
CMFT trains only on the training part of ``config.data.split`` (the same setting as CMFF's: 5 folds by seed 0),
never on CMFF's validation fold; ``--config.data.split.folds=0`` trains on every subject (the paper's way, with no
validation fold for CMFF either), ``--config.data.split.file=W/split.json`` on the ids of a ``configs/split.py`` split.
Data augmentation (not in the paper, off by default): ``--config.data.augment.preset=nnunet`` (docs/data.md).
"""

import ml_collections

from cmfl_jax import config_defaults as defaults
from cmfl_jax.config_variants import apply_variants


def _smoke(config: ml_collections.ConfigDict) -> None:
    defaults.use_smoke_sizes(config)
    config.train.update(steps=6, log_every=1, save_every=3, preview_every=3)


def _cpu64(config: ml_collections.ConfigDict) -> None:
    """The paper's U-Net (base 16, depth 4) on 64^3 patches, a short CPU run."""
    config.data.patch_size = (64, 64, 64)
    config.train.update(steps=80, log_every=5, save_every=20, preview_every=40)


def _cpu(config: ml_collections.ConfigDict) -> None:
    """The CPU demonstration pair with configs/cmff.py:cpu (same data and U-Net)."""
    defaults.use_cpu_sizes(config)
    config.train.update(steps=300, log_every=10, save_every=100, preview_every=100)


# "full": the defaults are the paper's sizes (20000 steps: ours); the name makes the choice explicit.
VARIANTS = {"full": lambda config: None, "smoke": _smoke, "cpu64": _cpu64, "cpu": _cpu}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "cmft"
    config.seed = 0
    config.distributed = defaults.distributed_config()  # several processes/hosts: docs/multi_host.md
    config.data = defaults.data_config()
    config.model = defaults.model_config()
    config.train = defaults.train_config(steps=20000)
    config.cmft = ml_collections.ConfigDict(
        {
            "objective": "cycle",  # "cycle" (CMFT) or "self" (self-reconstruction, Ours_self)
            "lambda_cycle": 10.0,  # lambda of Eq. 6
            "identity_weight": 0.0,  # CycleGAN's identity loss, off by default (not in the paper)
            "g_lr": 1e-4,
            "d_lr": 1e-4,
            "b1": 0.5,  # CycleGAN's Adam beta1
            "b2": 0.999,
            "decay_start": -1,  # step where the learning rate starts its linear decay to 0 (-1: constant)
        }
    )
    return apply_variants(config, arg, VARIANTS, "cmft")
