"""Phase 2, CMFF (section 3.2): segmentation by S_A, S_B and the mask-guided fusion branch S_F.

One network (:class:`~cmfl_jax.models.CMFFNet`), one optax state (``seg``). S_A and S_B start from
the CMFT generators G_AB and G_BA (every layer but the 1^3 ``head``; Table 4's "Ours"), from the
self-reconstruction generators G_AA and G_BB ("Ours_self"), or at random ("Ours_random"); S_F
always starts at random. The loss is the V-Net soft Dice (Eq. 8) summed over the branches that
run (Eq. 7). The Dice runs over the network's 4 mutually exclusive classes (background, NCR/NET,
oedema, ET), the classes its softmax predicts; the BraTS regions are nested unions of them and
would need one sigmoid per region instead. ``config.cmff.ce_weight`` > 0 adds a cross-entropy term per
branch (nnU-Net's Dice + CE; not in the paper): a soft Dice gradient vanishes for a class predicted on
far too many voxels, and CE removes that failure mode in short runs. Validation predicts whole held-out
volumes by sliding windows and scores them with the BraTS metrics; the best one (mean Dice over ET, WT,
TC) is kept.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from flax.training import train_state

from cmfl_jax import checkpoints, losses, sharding
from cmfl_jax.classes import NUM_CLASSES, classes_to_labels, labels_to_classes
from cmfl_jax.data.dataset import load_entries
from cmfl_jax.data.pairs import pair_channels, split_pairs
from cmfl_jax.data.pipeline import patch_dataset
from cmfl_jax.data.splits import split_subjects
from cmfl_jax.errors import CMFLError
from cmfl_jax.graft import graft_params
from cmfl_jax.inference import cmff_predict_fn, restrict_to_brain, sliding_window
from cmfl_jax.metrics import REGIONS, brats_metrics
from cmfl_jax.models import CMFFNet, UNet3D, init_params
from cmfl_jax.previews import save_segmentation_png
from cmfl_jax.progress import progress
from cmfl_jax.training import DTYPES, Phase, fit, make_optimizer, skip_nonfinite

# config.init.mode -> the CMFT checkpoint items that become (S_A, S_B).
INIT_SOURCES = {"cmft": ("g_ab", "g_ba"), "self": ("g_aa", "g_bb"), "random": None}
# The CMFT run's settings that must equal this run's for its generators to fit the branches.
MATCHING_KEYS = (("data", "pairing"), ("model", "base"), ("model", "depth"))


def build_model(config: ml_collections.ConfigDict) -> CMFFNet:
    m = config.model
    return CMFFNet(branches=m.branches, attention=m.attention, base=m.base, depth=m.depth,
                   conv_impl=m.conv_impl, dtype=DTYPES[m.dtype])


def random_params(rng: jax.Array, model: CMFFNet) -> dict:
    """Random params without compiling the network (conv params do not depend on the input size)."""
    size = 2**model.depth
    x = jax.ShapeDtypeStruct((1, size, size, size, 2), jnp.float32)
    return init_params(model, rng, x, x)


def _check_cmft_config(cmft_workdir: str, config: ml_collections.ConfigDict) -> None:
    """Fail early when the CMFT run used another pairing, width or depth (its ``config.json``, if any)."""
    path = os.path.join(cmft_workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    for section, key in MATCHING_KEYS:
        theirs, ours = saved.get(section, {}).get(key), config[section][key]
        if theirs is not None and theirs != ours:
            raise CMFLError(path, f"the CMFT run has {section}.{key}={theirs!r} but this run has {ours!r}; "
                                  f"set --config.{section}.{key}={theirs!r} or train CMFT with this setting")


def cmft_checkpoint(config: ml_collections.ConfigDict) -> tuple[str, int]:
    """(CMFT workdir, checkpoint step) that ``config.init`` points at; fails with a clear message first."""
    workdir = config.init.cmft_workdir
    if not workdir:
        raise CMFLError("config.init.cmft_workdir", f"is empty but config.init.mode={config.init.mode!r} needs a "
                                                    "CMFT run: train one (configs/cmft.py) and pass its workdir, "
                                                    "or set --config.init.mode=random")
    if not os.path.isdir(workdir):
        raise CMFLError(workdir, "CMFT workdir (config.init.cmft_workdir) does not exist")
    step = checkpoints.latest_step(workdir) if config.init.cmft_step < 0 else int(config.init.cmft_step)
    if step is None:
        raise CMFLError(os.path.join(workdir, "checkpoints"), "no CMFT checkpoint here; train CMFT into this "
                                                              "workdir first (configs/cmft.py)")
    _check_cmft_config(workdir, config)
    return workdir, step


def load_generators(config: ml_collections.ConfigDict) -> tuple[dict, dict, str]:
    """Params of the two generators that initialise (S_A, S_B), and where they came from.

    Restores only ``params`` of the two items (no optimizer state) against an abstract target
    from ``jax.eval_shape``.
    """
    names = INIT_SOURCES[config.init.mode]
    workdir, step = cmft_checkpoint(config)
    m = config.model
    generator = UNet3D(2, base=m.base, depth=m.depth, conv_impl=m.conv_impl)
    size = 2**m.depth
    abstract = jax.eval_shape(generator.init, jax.random.key(0), jnp.zeros((1, size, size, size, 2)))["params"]
    manager = checkpoints.make_manager(workdir, None, read_only=True)
    where = os.path.join(manager.directory, str(step))
    try:
        available = {n for n in os.listdir(where) if os.path.isdir(os.path.join(where, n))}
        missing = [n for n in names if n not in available]
        if missing:
            other = "self" if config.init.mode == "cmft" else "cmft"
            raise CMFLError(where, f"has no generator {missing[0]} (items: {', '.join(sorted(available))}); "
                                   f"was it trained with another objective? try --config.init.mode={other}")
        restored, _ = checkpoints.restore(manager, {n: {"params": abstract} for n in names}, step=step,
                                          partial=True)
    finally:
        manager.close()
    return _restored_only(restored[names[0]]["params"]), _restored_only(restored[names[1]]["params"]), where


def _restored_only(tree: dict) -> dict:
    """Drop the leaves a partial restore left abstract (absent from the checkpoint), so grafting reports them."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not isinstance(v, jax.ShapeDtypeStruct)})


def initial_params(rng: jax.Array, model: CMFFNet, config: ml_collections.ConfigDict) -> dict:
    """Random params, with S_A and S_B grafted from the generators unless ``init.mode`` is "random"."""
    mode = config.init.mode
    if mode not in INIT_SOURCES:
        raise CMFLError("config.init.mode", f"unknown value {mode!r}; choose one of {', '.join(INIT_SOURCES)}")
    params = dict(random_params(rng, model))
    if INIT_SOURCES[mode] is None:
        return params
    source_a, source_b, where = load_generators(config)
    for branch, source, name in (("S_A", source_a, INIT_SOURCES[mode][0]), ("S_B", source_b, INIT_SOURCES[mode][1])):
        if branch in params:
            params[branch], copied = graft_params(source, params[branch], skip=("head",), where=f"{where}/{name}")
            logging.info("init: %s <- %s (%d arrays: every layer but head)", branch, name, len(copied))
    return params


def create_state(rng: jax.Array, config: ml_collections.ConfigDict, resuming: bool = False
                 ) -> train_state.TrainState:
    """The segmentation TrainState with a fresh Adam; ``resuming`` skips the CMFT restore (the checkpoint wins)."""
    model = build_model(config)
    c = config.cmff
    tx = make_optimizer(c.lr, c.b1, c.b2, config.train.steps, c.decay_start)
    params = random_params(rng, model) if resuming else initial_params(rng, model, config)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def segmentation_loss(outputs: dict, target_onehot: jax.Array, ce_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """Eq. 7: the sum over the branches that ran of the soft Dice loss (Eq. 8) [+ ``ce_weight`` x cross-entropy]."""
    terms = {}
    for k in ("a", "b", "f"):
        logits = outputs[f"logits_{k}"]
        if logits is None:
            continue
        terms[f"dice_loss_{k}"] = losses.soft_dice_loss(jax.nn.softmax(logits), target_onehot)
        if ce_weight:
            terms[f"ce_{k}"] = ce_weight * jnp.mean(optax.softmax_cross_entropy(logits, target_onehot))
    return sum(terms.values()), terms


def train_step(states: dict, batch: dict, rng: jax.Array, *, pairing: str, ce_weight: float = 0.0
               ) -> tuple[dict, dict]:
    """One CMFF step on a batch of (image, label) patches."""
    del rng  # deterministic; the argument keeps the signature of every phase
    state = states["seg"]
    a, b = split_pairs(batch["image"], pairing)
    target = jax.nn.one_hot(labels_to_classes(batch["label"]), NUM_CLASSES)

    def loss_fn(params):
        return segmentation_loss(state.apply_fn({"params": params}, a, b), target, ce_weight)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return skip_nonfinite(states, {"seg": state.apply_gradients(grads=grads)}, {"loss": loss, **terms}, grads)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The jitted step (states donated), data parallel over ``mesh`` (default: all devices)."""
    step = functools.partial(train_step, pairing=config.data.pairing, ce_weight=config.cmff.ce_weight)
    return sharding.jit_train_step(step, mesh)


def summarise(per_subject: list[dict]) -> dict[str, float]:
    """Mean over subjects of each region's metrics, plus ``dice_mean`` over ET, WT, TC (the best-model score)."""
    out = {}
    for region in REGIONS:
        for metric in ("dice", "hd95", "sensitivity", "specificity"):
            out[f"{metric}_{region}"] = float(np.mean([m[region][metric] for m in per_subject]))
    out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in REGIONS]))
    return out


class Validator:
    """Sliding-window prediction of the held-out subjects, BraTS metrics, an overlay PNG, and the best model."""

    def __init__(self, config: ml_collections.ConfigDict, entries: list, workdir: str):
        self.config, self.entries, self.workdir = config, entries, workdir
        v = config.val
        self.predict = cmff_predict_fn(build_model(config), config.data.pairing, mirror=v.mirror)
        self.best_manager = checkpoints.make_manager(workdir, 1, subdir="best")
        meta = checkpoints.read_meta(self.best_manager)
        self.best = float(meta["val"]["dice_mean"]) if meta else -1.0

    def due(self, step: int) -> bool:
        return bool(self.entries) and (step % self.config.val.every == 0 or step == self.config.train.steps)

    def evaluate(self, params: dict, step: int | None = None) -> tuple[dict[str, float], list]:
        """Metrics averaged over the validation subjects; also (subject, image, label, pred, WT Dice) of the first."""
        v, window = self.config.val, tuple(self.config.data.patch_size)
        predict = functools.partial(self.predict, params)
        per_subject, first = [], None
        for entry in progress(self.entries, desc=f"cmff validation (step {step}): subject"):
            image = np.asarray(entry.image())
            probs = sliding_window(predict, image, window, v.overlap, v.batch_size)
            pred = restrict_to_brain(classes_to_labels(np.argmax(probs, axis=-1)), image)
            label = np.asarray(entry.label())
            per_subject.append(brats_metrics(pred, label, entry.meta["spacing"]))
            if first is None:
                first = (entry.subject_id, image, label, pred, per_subject[0]["WT"]["dice"])
        return summarise(per_subject), first

    def __call__(self, step: int, states: dict) -> dict[str, float]:
        metrics, (subject, image, label, pred, dice_wt) = self.evaluate(states["seg"].params, step)
        save_segmentation_png(os.path.join(self.workdir, "previews", f"cmff_val_{step:07d}.png"), image, label, pred,
                              title=f"CMFF step {step}, {subject}: WT Dice {dice_wt:.3f} (mean over "
                                    f"{len(self.entries)} validation subjects {metrics['dice_WT']:.3f})")
        if metrics["dice_mean"] > self.best:
            self.best = metrics["dice_mean"]
            checkpoints.save(self.best_manager, step, states, {"step": step, "val": metrics}, force=True)
            logging.info("cmff: new best mean Dice %.4f at step %d (saved to %s)", self.best, step,
                         self.best_manager.directory)
        return metrics

    def close(self) -> None:
        checkpoints.close(self.best_manager)


def _data(config: ml_collections.ConfigDict) -> tuple[list, list]:
    entries = load_entries(config.data)
    v = config.val
    train, val = split_subjects(entries, v.folds, v.fold, v.seed)
    if v.max_subjects > 0:
        val = val[: v.max_subjects]
    logging.info("cmff: %d training and %d validation subjects (fold %d of %d)", len(train), len(val), v.fold,
                 v.folds)
    return train, val


def save_final(workdir: str, states: dict, step: int, val: dict | None) -> None:
    """``<workdir>/final``: the states at the last step and their validation metrics (a finished run)."""
    manager = checkpoints.make_manager(workdir, 1, subdir="final")
    try:
        if manager.latest_step() != step:
            checkpoints.save(manager, step, states, {"step": step, "val": val or {}}, force=True)
    finally:
        checkpoints.close(manager)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train CMFF on the configured data, validating as configured; returns the final states."""
    sharding.initialize_distributed(config)
    pair_channels(config.data.pairing)  # fail early on a bad pairing
    if config.init.mode not in INIT_SOURCES:
        raise CMFLError("config.init.mode", f"unknown value {config.init.mode!r}; "
                                            f"choose one of {', '.join(INIT_SOURCES)}")
    if config.train.fresh:
        for sub in ("best", "final"):  # fit() removes checkpoints/; a fresh run keeps no best or final either
            shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    resuming = not config.train.fresh and checkpoints.latest_step(workdir) is not None
    if INIT_SOURCES[config.init.mode] and not resuming:
        cmft_checkpoint(config)  # before the data: a missing CMFT run is reported at once
    train_entries, val_entries = _data(config)
    d = config.data
    dataset = patch_dataset(train_entries, d.patch_size, seed=config.seed,
                            batch_size=sharding.host_batch_size(config.train.batch_size), tumour_prob=d.tumour_prob,
                            flip=d.flip, num_workers=d.num_workers, shard=sharding.data_shard(config))
    states = {"seg": create_state(jax.random.key(config.seed), config, resuming=resuming)}
    validator = Validator(config, val_entries, workdir)
    last_val: dict = {}

    def on_step(step, states, batch):
        del batch
        if not validator.due(step):
            return None
        last_val.clear()
        last_val.update(validator(step, states))
        return last_val

    phase = Phase("cmff", states, make_train_step(config), to_batch=lambda b: {"image": jnp.asarray(b["image"]),
                                                                              "label": jnp.asarray(b["label"])},
                  on_step=on_step)
    try:
        states, step = fit(phase, dataset, config.train, workdir, config.seed)
    finally:
        validator.close()
    if step >= config.train.steps:  # not after a SIGTERM/SIGINT stop
        save_final(workdir, states, step, last_val)
    return states


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    train_and_evaluate(config, workdir)
