"""CMFF's train state and its jitted step (section 3.2): Eq. 7 over the branches that run.

One network (:class:`~cmfl_jax.models.CMFFNet`), one optax state (``seg``). The Dice runs over the
network's mutually exclusive classes (background, NCR/NET, oedema, ET; those of the run's label set,
:func:`cmfl_jax.label_sets.run_label_set`, e.g. a fifth, the resection cavity), the classes its softmax
predicts, or with ``config.model.output="regions"`` over the WT, TC, ET regions its sigmoids predict.
``config.cmff.ce_weight`` > 0 adds a cross-entropy term per branch (binary per region for regions;
nnU-Net's Dice + CE; not in the paper): a soft Dice gradient vanishes for a class predicted on far too
many voxels, and CE removes that failure mode in short runs.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
from flax.training import train_state

from cmfl_jax import losses, sharding
from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.label_classes import CLASS_LABELS, check_output, label_targets
from cmfl_jax.label_sets import run_label_set
from cmfl_jax.models import builder
from cmfl_jax.training import loss_scale
from cmfl_jax.training.cmft_init import initial_params
from cmfl_jax.training.state import create_train_state, make_optimizer, skip_nonfinite


def create_states(rng: jax.Array, config: ml_collections.ConfigDict, resuming: bool = False) -> dict:
    """The train states the job trains: ``seg``, and the float16 loss scale (:mod:`~cmfl_jax.training.loss_scale`)."""
    return {"seg": create_state(rng, config, resuming), **loss_scale.create(config, ("seg",))}


def create_state(rng: jax.Array, config: ml_collections.ConfigDict, resuming: bool = False
                 ) -> train_state.TrainState:
    """The segmentation state with a fresh Adam; ``resuming`` skips the CMFT restore (the checkpoint wins)."""
    model = builder.cmff_net(config.model, run_label_set(config).num_classes)
    c = config.cmff
    tx = make_optimizer(c.lr, c.b1, c.b2, config.train.steps, c.decay_start)
    params = builder.random_params(model, rng) if resuming else initial_params(rng, model, config)
    return create_train_state(rng, model, tx, params)


def train_step(states: dict, batch: dict, *, pairing: str, ce_weight: float = 0.0, output: str = "classes",
               classes: tuple[int, ...] = CLASS_LABELS, scaled: bool = False) -> tuple[dict, dict]:
    """One CMFF step on a batch of (image, label) patches; ``scaled``: float16 with the loss scale of
    ``states["loss_scale"]["seg"]``."""
    state = states["seg"]
    a, b = split_pairs(batch["image"], pairing)
    target = label_targets(batch["label"], output, classes)

    def loss_fn(params):
        return losses.cmff_segmentation_loss(state.apply_fn({"params": params}, a, b), target, ce_weight, output)

    scale = states[loss_scale.ITEM]["seg"] if scaled else None
    (loss, terms), grads, new_scale, headroom = loss_scale.value_and_grad(loss_fn, state.params, scale)
    metrics = {"loss": loss, **terms}
    if not scaled:
        return skip_nonfinite(states, {"seg": state.apply_gradients(grads=grads)}, metrics, grads)
    metrics = loss_scale.guard_metrics(metrics, grads, headroom, {"seg": new_scale})
    new_states, metrics = skip_nonfinite({"seg": state}, {"seg": state.apply_gradients(grads=grads)}, metrics, grads)
    return {**new_states, loss_scale.ITEM: {"seg": new_scale}}, metrics


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The jitted step (states donated), data parallel over ``mesh`` (default: all devices)."""
    step = functools.partial(train_step, pairing=config.data.pairing, ce_weight=config.cmff.ce_weight,
                             output=check_output(config.model.get("output", "classes")),
                             classes=run_label_set(config).classes, scaled=loss_scale.enabled(config))
    return sharding.jit_train_step(step, mesh)
