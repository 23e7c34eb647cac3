"""Mixed precision: with ``config.model.dtype="bfloat16"`` the CMFF step computes in bfloat16, keeps float32
params and optimizer state, and still trains (the loss on a fixed phantom patch falls)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.data.pipeline import crop_centered
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.synthetic import make_subject
from cmfl_jax.training.cmff_step import create_state, make_train_step

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks

STEPS = 30
PATCH = (32, 32, 32)


def phantom_batch() -> dict:
    """One tumour-centred 32^3 patch of a synthetic HGG subject (all four classes present)."""
    subject = make_subject(1, (48, 48, 48), lgg=False)
    image = np.moveaxis(preprocess_images(subject.images), 0, -1)
    return {"image": crop_centered(image, subject.centre, PATCH)[None],
            "label": crop_centered(subject.label, subject.centre, PATCH)[None]}


@pytest.mark.slow
def test_bfloat16_cmff_overfits_a_patch_with_float32_params():
    config = load_config("cmff:smoke")  # U-Net base 4, depth 2, random init
    config.model.dtype, config.model.conv_impl = "bfloat16", "native"
    config.cmff.lr, config.cmff.ce_weight = 1e-2, 1.0  # a fast fall in 30 steps (bf16 and f32 alike)
    batch = phantom_batch()
    assert set(np.unique(batch["label"])) == {0, 1, 2, 4}
    states = {"seg": create_state(jax.random.key(0), config)}
    step = make_train_step(config)
    hlo = step.lower(states, batch, jax.random.key(0)).as_text()
    assert "bf16" in hlo and "convolution" in hlo  # the convolutions run in bfloat16
    losses = []
    for i in range(STEPS):
        states, metrics = step(states, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses  # measured: 6.83 -> 3.22 at step 30
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 0.8 * (STEPS - 1), losses
    leaves = jax.tree.leaves((states["seg"].params, states["seg"].opt_state))
    assert leaves and all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(states["seg"].params))
