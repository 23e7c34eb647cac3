"""Phase 1, CMFT: the CycleGAN between the modality pairs (section 3.1).

  python -m cmfl_jax.main --config=configs/cmft.py --workdir=runs/cmft [--config.data.root=/data/BraTS2018]
Variants: ``configs/cmft.py:smoke`` (seconds, 32^3, base 4, depth 2), ``:cpu`` (the CPU demonstration that
``configs/cmff.py:cpu`` starts from), ``:cpu64`` (the paper's U-Net at 64^3, ~15 min on 2 CPU cores),
``:full`` (the paper's sizes, the same as the default: 128^3 patches, base 16, depth 4; 20000 steps is this project's
choice, the paper gives only 18 h 57 min of training; a GPU/TPU job), ``--config.cmft.objective=self`` (Ours_self),
``--config.data.pairing=t1-flair/t2-t1ce``.
CMFT trains only on the training part of ``config.data.split`` (the same setting as CMFF's: 5 folds by seed 0),
never on CMFF's validation fold; ``--config.data.split.folds=0`` trains on every subject (the paper's way, with no
validation fold for CMFF either), ``--config.data.split.file=W/split.json`` on the ids of a ``configs/split.py`` split.
Data augmentation (not in the paper, off by default): ``--config.data.augment.preset=nnunet`` (docs/data.md).
"""

import ml_collections

from cmfl_jax.config_defaults import data_config, model_config, train_config, use_cpu_sizes, use_smoke_sizes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "cmft"
    config.seed = 0
    config.distributed = ml_collections.ConfigDict(  # several processes/hosts: docs/multi_host.md
        {
            "enabled": False,  # jax.distributed.initialize() first; each process reads its share of the patches
            "coordinator_address": "",  # host:port of process 0; "": $JAX_COORDINATOR_ADDRESS or JAX's detection
            "num_processes": 0,  # 0: $JAX_NUM_PROCESSES or JAX's detection (SLURM, Open MPI, TPU pods, GKE)
            "process_id": -1,  # -1: $JAX_PROCESS_ID or JAX's detection
        }
    )
    config.data = data_config()
    config.model = model_config()
    config.train = train_config(steps=20000)
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
    if arg == "full":
        pass  # the defaults above are the paper's sizes (20000 steps: ours); the name makes the choice explicit
    elif arg == "smoke":
        use_smoke_sizes(config)
        config.train.steps = 6
        config.train.log_every = 1
        config.train.save_every = 3
        config.train.preview_every = 3
    elif arg == "cpu64":
        # What 2 CPU cores train in ~15 minutes: the paper's U-Net (base 16, depth 4) on 64^3 patches.
        config.data.patch_size = (64, 64, 64)
        config.train.steps = 80
        config.train.log_every = 5
        config.train.save_every = 20
        config.train.preview_every = 40
    elif arg == "cpu":
        # The CPU demonstration pair with configs/cmff.py:cpu (same data and U-Net): ~10 min on 2 cores.
        use_cpu_sizes(config)
        config.train.steps = 300
        config.train.log_every = 10
        config.train.save_every = 100
        config.train.preview_every = 100
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/cmft.py (known: smoke, cpu, cpu64, full)")
    return config
