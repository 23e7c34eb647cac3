"""Config blocks shared by the job configs in ``configs/`` (one definition, many jobs)."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def data_config() -> ml_collections.ConfigDict:
    """Where the data is and how it is pre-processed and sampled.

    ``root`` empty means the built-in synthetic data set (``synthetic.*``), generated once
    under the cache folder and reused. ``split`` is the one train/validation split of every phase
    (:mod:`cmfl_jax.data.splits`): CMFT trains on its training part only, CMFF trains on it and validates
    on fold ``fold``, the demo predicts and scores that fold. ``folds`` <= 1: no validation fold, every
    subject trains (the paper's way). ``file``: a ``split.json`` from ``configs/split.py`` (or a demo
    workdir), whose ids are then used as they are (``folds``, ``fold``, ``seed`` are ignored). Prepare,
    predict and evaluate take every subject of the root. ``augment``: training-patch augmentation, off in the
    paper's recipe (:func:`augment_config`).
    """
    return ml_collections.ConfigDict(
        {
            "root": "",  # a folder of BraTS subjects, or a CSV of the explicit layout
            "cache_dir": "",  # "" -> $CMFL_JAX_CACHE or ~/.cache/cmfl_jax
            # "auto": float16 memory map for z-scored data (fastest patch reads), else "blosc2" (float32,
            # lossless, the smallest); "npy": float32 memory map (the largest); sizes in docs/data.md
            "cache_storage": "auto",
            "normalization": "zscore_brain",  # the paper; "zscore_clip" (brain 0.5-99.5 % clipped first) | "none"
            "require_labels": True,
            # the release's label convention (cmfl_jax.label_sets, docs/data.md): "auto" (from the file names;
            # BraTS 2024 GLI post-treatment, 4 = resection cavity, needs "brats2024_gli") | "brats2021" |
            # "brats2023" | "brats2024_gli" | "brats2024_ped"
            "label_set": "auto",
            # lgg_fraction: share of LGG-like subjects (no enhancing tumour)
            "synthetic": {"n": 10, "shape": (240, 240, 155), "layout": "brats2018", "seed": 0, "lgg_fraction": 0.25},
            "patch_size": (128, 128, 128),
            "tumour_prob": 1.0,  # probability that a patch centre is a tumour voxel (1.0: the paper)
            "flip": False,  # random flips of each axis: the same as augment.p_mirror=0.5
            "augment": augment_config(),
            "num_workers": 0,
            "pairing": "t1-t1ce/t2-flair",  # or "t1-flair/t2-t1ce" (Table 4)
            # subjects dealt into `folds` folds by `seed`, fold `fold` held out; or the ids of a split.json `file`
            "split": {"file": "", "folds": 5, "fold": 0, "seed": 0},
        }
    )


def augment_config() -> ml_collections.ConfigDict:
    """``config.data.augment``: each transform's probability per patch and its range (:mod:`cmfl_jax.data.augment`).

    Every probability unset: the preset's (``none``: 0, the paper's recipe, no augmentation; ``nnunet``: mirror
    0.5 per axis, rotation and scaling 0.2 each, intensity 0.15, gamma 0.3, noise 0.1, blur 0.2). A probability
    set on the command line wins over the preset's, e.g. ``--config.data.augment.preset=nnunet
    --config.data.augment.p_rotate=0`` (rotation and scaling are the costly transforms on a CPU: docs/timings.md).
    """
    unset = ("p_mirror", "p_rotate", "p_scale", "p_intensity", "p_gamma", "p_noise", "p_blur")
    return ml_collections.ConfigDict(
        {
            "preset": "none",  # or "nnunet"
            **{name: placeholder(float) for name in unset},  # one each (a shared one would tie them together)
            "max_rotate_deg": 30.0,  # each of the 3 angles uniform in +-this
            "scale_range": (0.7, 1.4),  # > 1 enlarges the anatomy
            "image_order": 1,  # interpolation of the image when rotated/scaled: 1 linear, 3 cubic (the label: 0)
            "intensity_scale": (0.75, 1.25),  # per channel, on the brain
            "intensity_shift": (-0.1, 0.1),  # per channel, on the brain (z-scored units)
            "gamma_range": (0.7, 1.5),  # per channel, on the brain's values rescaled to [0, 1]
            "noise_std": (0.0, 0.3),  # Gaussian noise, its standard deviation uniform in this range
            "blur_sigma": (0.5, 1.0),  # Gaussian blur, sigma (voxels) per channel
            # "host": the transforms run in the grain worker (scipy); "device": the worker ships the patch (or a
            # window for a resample) and the drawn numbers, the accelerator transforms it (image_order 1 only)
            "where": "host",
        }
    )


def model_config() -> ml_collections.ConfigDict:
    """The U-Net of Fig. 3 (shared by the generators and the segmentation branches)."""
    return ml_collections.ConfigDict(
        {
            "base": 16,  # filters of the first level, doubled after every down-sampling (section 4.1)
            "depth": 4,  # number of down-samplings
            "conv_impl": "auto",  # "native" | "cpu_fast" | "onednn" | "auto" (onednn if built, else cpu_fast, on CPU)
            # compute dtype (params stay float32): "float32", "bfloat16", or "float16" with dynamic loss scaling
            # (train.loss_scale; for GPUs without bfloat16, e.g. the T4)
            "dtype": "float32",
        }
    )


def distributed_config() -> ml_collections.ConfigDict:
    """Several processes or hosts (docs/multi_host.md), shared by both training phases."""
    return ml_collections.ConfigDict(
        {
            "enabled": False,  # jax.distributed.initialize() first; each process reads its share of the patches
            "coordinator_address": "",  # host:port of process 0; "": $JAX_COORDINATOR_ADDRESS or JAX's detection
            "num_processes": 0,  # 0: $JAX_NUM_PROCESSES or JAX's detection (SLURM, Open MPI, TPU pods, GKE)
            "process_id": -1,  # -1: $JAX_PROCESS_ID or JAX's detection
        }
    )


def train_config(steps: int) -> ml_collections.ConfigDict:
    """Loop settings shared by both phases."""
    return ml_collections.ConfigDict(
        {
            "steps": steps,
            "batch_size": 1,  # per device (the paper: 1); the global batch is this times jax.device_count()
            "log_every": 10,  # metrics.jsonl / TensorBoard / log line every N steps
            "save_every": 100,  # checkpoint every N steps (and always at the last step)
            "max_to_keep": 3,
            "max_nonfinite": 5,  # NaN guard: updates with a non-finite loss/gradient are skipped; stop after N in a row
            "preview_every": 100,  # PNG preview every N steps (0: never)
            "fresh": False,  # True: ignore and delete the workdir's checkpoints, start at step 0
            # model.dtype=float16 only: the loss scale starts here, halves after a step whose gradients overflow
            # (skipped), doubles after growth_interval finite steps, never falls below minimum
            "loss_scale": {"initial": 32768.0, "growth_interval": 2000, "minimum": 1.0},
        }
    )


def use_smoke_sizes(config: ml_collections.ConfigDict) -> None:
    """Seconds-long runs (tests, CI): 4 synthetic 48^3 subjects (4 folds: 1 held out), 32^3 patches, U-Net
    base 4, depth 2.

    Shared by the ``:smoke`` variants of every phase, so a CMFT smoke checkpoint fits a CMFF smoke run and
    both hold out the same subject.
    """
    config.data.synthetic.n = 4
    config.data.split.folds = 4
    config.data.synthetic.shape = (48, 48, 48)
    config.data.patch_size = (32, 32, 32)
    config.model.base = 4
    config.model.depth = 2


def use_cpu_sizes(config: ml_collections.ConfigDict) -> None:
    """What 2 CPU cores train in a short run: 20 synthetic subjects at 96x96x64 (~2.4 mm voxels),
    64^3 patches, U-Net base 8, depth 3. Shared by ``configs/cmft.py:cpu`` and ``configs/cmff.py:cpu``.
    """
    config.data.synthetic.n = 20
    config.data.synthetic.shape = (96, 96, 64)
    config.data.patch_size = (64, 64, 64)
    config.model.base = 8
    config.model.depth = 3
