"""Phase 2, CMFF: segmentation with S_A, S_B initialised from the CMFT generators and the fusion branch S_F.

  python -m cmfl_jax.main --config=configs/cmff.py --workdir=runs/cmff --config.init.cmft_workdir=runs/cmft
Variants (they combine, with ``key=value`` parts too: ``configs/cmff.py:cpu,regions,train.steps=200``):
``configs/cmff.py:smoke`` (tests and CI: 32^3, base 4, depth 2; random init unless a CMFT smoke workdir
is given), ``:cpu`` (starts from ``configs/cmft.py:cpu``; a CPU run, times in docs/timings.md), ``:full`` (the paper's
sizes, the same as the default: 128^3 patches, base 16, depth 4, Adam 1e-4, Dice only; 20000 steps is this project's
choice, the paper gives only its training time, 18 h 57 min; a GPU/TPU job).
The subjects: ``config.data.split`` (shared with CMFT): 5 folds by seed 0, fold 0 is held out for validation and
CMFT never trains on it; ``--config.data.split.folds=0`` trains on every subject without validation (the paper's
way: it trained on all of BraTS and scored on the challenge's validation set); ``--config.data.split.file=
W/split.json`` uses the ids of a split written by ``configs/split.py``. Validation: every ``val.every`` steps on
the first ``val.max_subjects`` (20) held-out ids, at the last step on the whole fold (``val.full_at_end``).
Ablations are config values: ``--config.model.branches=A|B|A+B|fusion`` and ``--config.model.attention=
mask|cbam|none`` (Table 2), ``--config.init.mode=cmft|random|self`` and ``--config.data.pairing`` (Table 4);
``--config.model.output=regions`` (or the variant ``regions``) trains WT/TC/ET sigmoid heads with a region Dice
(docs/method.md).
Data augmentation (not in the paper, off by default): ``--config.data.augment.preset=nnunet`` (docs/data.md).
"""

import ml_collections

from cmfl_jax import config_defaults as defaults
from cmfl_jax.config_variants import apply_variants


def _smoke(config: ml_collections.ConfigDict) -> None:
    defaults.use_smoke_sizes(config)
    config.init.mode = "random"  # no CMFT run needed; set mode=cmft and cmft_workdir to start from one
    config.train.update(steps=6, log_every=1, save_every=3)
    config.val.every = 3


def _cpu(config: ml_collections.ConfigDict) -> None:
    """A short CPU budget, not the paper's 20k GPU steps: 10x the paper's learning rate, and Dice + CE (with Dice
    alone ET is still predicted over much of the healthy brain after 400 steps)."""
    defaults.use_cpu_sizes(config)
    config.cmff.update(lr=1e-3, ce_weight=1.0)
    config.train.update(steps=1000, save_every=100)
    config.val.every = 100


VARIANTS = {
    # The defaults are the paper's sizes (20000 steps: ours); the name makes the choice explicit on a GPU/TPU.
    "full": lambda config: None,
    "smoke": _smoke,
    "cpu": _cpu,
    "regions": lambda config: config.model.update(output="regions"),  # WT/TC/ET sigmoid heads (not in the paper)
    "nnunet_augment": lambda config: config.data.augment.update(preset="nnunet"),  # (not in the paper)
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "cmff"
    config.seed = 0
    config.distributed = defaults.distributed_config()  # several processes/hosts: docs/multi_host.md
    config.data = defaults.data_config()
    config.model = defaults.model_config()
    config.model.branches = "fusion"  # "fusion" (Ours) | "A" | "B" | "A+B" (Table 2)
    config.model.attention = "mask"  # "mask" (mask-guided, Ours) | "cbam" (w CA) | "none" (w/o MG)
    config.model.output = "classes"  # "classes" (4-class softmax, the paper) | "regions" (WT/TC/ET sigmoids)
    # The label set whose classes the head predicts (5 classes with brats2024_gli's resection cavity); "": the
    # data's (data.label_set, or its file names), which the job records here in config.json.
    config.model.label_set = ""
    config.train = defaults.train_config(steps=20000)
    config.init = ml_collections.ConfigDict(
        {
            "mode": "cmft",  # "cmft" (G_AB -> S_A, G_BA -> S_B) | "self" (G_AA, G_BB) | "random" (Table 4)
            "cmft_workdir": "",  # workdir of the CMFT run (configs/cmft.py) to take the generators from
            "cmft_step": -1,  # its checkpoint step; -1: the latest
        }
    )
    config.cmff = ml_collections.ConfigDict(
        {
            "lr": 1e-4,  # the paper's Adam
            "b1": 0.9,
            "b2": 0.999,
            "decay_start": -1,
            "ce_weight": 0.0,  # > 0 adds that times the cross-entropy to each branch's Dice loss (not in the paper)
        }
    )
    config.val = ml_collections.ConfigDict(
        {
            # The held-out subjects are fold data.split.fold of data.split.folds (or data.split.file's list).
            "every": 500,  # validate every N steps (and at the last step)
            "max_subjects": 20,  # periodic validations: the first N held-out ids, sorted (0: all); picks best/
            "full_at_end": True,  # the last step validates the whole held-out fold (final/ keeps those metrics)
            "overlap": 0.5,  # sliding-window overlap; the window is data.patch_size
            "batch_size": 1,  # windows per network call
            "mirror": False,  # test-time mirroring (8 flips): 8x the time
            # picks best/ and tunes the ET threshold: "legacy" (mean Dice) | "lesionwise" (mean lesion-wise
            # Dice of the 2023-2024 leaderboards, cmfl_jax/lesion_metrics.py)
            "metric": "legacy",
        }
    )
    return apply_variants(config, arg, VARIANTS, "cmff")
