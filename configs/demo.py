"""The whole method in one command: CMFT -> CMFF -> predict -> evaluate -> export, then one summary.

  python -m cmfl_jax.main --config=configs/demo.py --workdir=runs/demo
On the built-in synthetic data by default (``--config.data.root=/data/BraTS2018`` for real data). Variants:
the default (a CPU-sized run; its time and held-out Dice are in docs/timings.md and docs/results.md), ``:smoke``
(for CI),
``:full`` (the paper's sizes: 128^3 patches, base 16, depth 4; 20000 steps per phase, this project's choice: the
paper gives only its training time, 18 h 57 min; a GPU/TPU job). Sizes combine with ``regions``,
``nnunet_augment`` and ``key=value`` parts: ``configs/demo.py:smoke,regions,cmff.train.steps=3``.

Each stage's settings come from its own config file (``configs/<job>.py``, the same variant); the data set,
the U-Net and the seed are shared by all stages and live at the top (``config.data``, ``config.model``,
``config.seed``). Any value can be overridden: ``--config.cmff.train.steps=500``, ``--config.model.attention=cbam``,
``--config.data.synthetic.n=40``. The held-out subjects are the validation fold of ``config.data.split``
(``--config.data.split.file=W/split.json`` for the ids of a ``configs/split.py`` split), written to the workdir as
``split.json``, ``train.csv`` and ``validation.csv``; the job fills in the paths that tie the stages together
(``data.split.file``, ``cmff.init.cmft_workdir``, ``predict.model_dir``, ...).
"""

from __future__ import annotations

import ml_collections

from cmfl_jax.config_variants import apply_variants, load_config, sibling, split_parts
from cmfl_jax.jobs import PIPELINE as STAGES  # the method's flow; each stage has its own config file
from cmfl_jax.postprocess import DEFAULT_ET_MIN_MM3

# demo size -> the variant of configs/cmft.py and configs/cmff.py it starts from.
SIZES = {"default": "cpu", "smoke": "smoke", "full": "full"}
TRAINING = ("cmft", "cmff")  # the stages that take the size
SHARED = ("seed", "data", "model")  # one value for every stage; removed from the stage configs
# Parts of the variant that combine with a size (``configs/demo.py:smoke,regions``); key=value parts too.
VARIANTS = {
    "regions": lambda config: config.model.update(output="regions"),
    "nnunet_augment": lambda config: config.data.augment.update(preset="nnunet"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = split_parts(arg)
    sizes = [part for part in parts if part in SIZES]
    variant = sizes[-1] if sizes else "default"
    stages = {name: load_config(sibling(__file__, name) + (f":{SIZES[variant]}" if name in TRAINING else ""))
              for name in STAGES}
    config = ml_collections.ConfigDict()
    config.job = "demo"
    config.seed = stages["cmff"].seed
    config.data = stages["cmff"].data  # the CMFT and CMFF variants share their data sizes (use_*_sizes)
    config.model = stages["cmff"].model  # U-Net sizes + the CMFF variant (branches, attention)
    for name in STAGES:
        for key in SHARED:
            if key in stages[name]:
                del stages[name][key]
        config[name] = stages[name]
    config.cmff.init.mode = "cmft"  # S_A, S_B start from the generators of the CMFT stage (the paper)
    # The held-out subjects are CMFF's validation fold, so nothing chosen on them may score them: predict and export
    # take final/ (not best/) and a fixed ET threshold (not the one tuned on that fold). configs/cv.py chooses on
    # an inner split instead.
    config.predict.checkpoint = "final"
    config.predict.postprocess.et_min_mm3 = DEFAULT_ET_MIN_MM3
    config.export.checkpoint = "final"
    if variant == "default":
        # Under 10 minutes on 2 CPU cores from a cold start, with a clearly non-trivial held-out Dice: the :cpu
        # data and U-Net (96x96x64 subjects, base 8, depth 3) on fewer, smaller patches and fewer steps.
        config.data.synthetic.n = 20
        config.data.patch_size = (32, 32, 32)
        # A 32^3 patch centred on the tumour never shows the healthy brain far from it, and the model then marks
        # oedema there (held-out WT Dice 0.33 after 600 steps); half of the centres anywhere in the brain: 0.83+.
        config.data.tumour_prob = 0.5
        config.cmft.train.steps = 150
        config.cmft.train.log_every = 10
        config.cmft.train.save_every = 50
        config.cmft.train.preview_every = 50
        config.cmff.train.steps = 600
        config.cmff.train.log_every = 20
        config.cmff.train.save_every = 100
        config.cmff.val.every = 300
    return apply_variants(config, ",".join(p for p in parts if p not in SIZES), VARIANTS, "demo")
