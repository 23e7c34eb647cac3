"""Loss functions against values computed by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax import losses


def test_lsgan_losses_by_hand():
    d_real = jnp.array([1.0, 0.5, 0.0])  # (0, 0.25, 1) -> mean 5/12
    d_fake = jnp.array([0.2, -0.4])  # (0.04, 0.16) -> mean 0.1
    assert float(losses.lsgan_discriminator_loss(d_real, d_fake)) == pytest.approx(5 / 12 + 0.1)
    assert float(losses.lsgan_generator_loss(d_fake)) == pytest.approx((0.64 + 1.96) / 2)


def test_l1_by_hand():
    x = jnp.array([[1.0, -2.0], [3.0, 0.0]])
    y = jnp.array([[0.0, 0.0], [1.0, 0.5]])
    assert float(losses.l1_loss(x, y)) == pytest.approx((1 + 2 + 2 + 0.5) / 4)


def test_soft_dice_by_hand():
    target = np.zeros((1, 2, 1, 1, 2), np.float32)
    target[0, 0, 0, 0, 1] = 1  # class 1 at voxel 0, class 0 at voxel 1
    target[0, 1, 0, 0, 0] = 1
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32).reshape(1, 2, 1, 1, 2)
    # class 0: 2*0.5 / (0.75 + 1) ; class 1: 2*0.75 / (1.25 + 1)
    expected = 1 - (2 * 0.5 / 1.75 + 2 * 0.75 / 2.25) / 2
    assert float(losses.soft_dice_loss(jnp.asarray(probs), jnp.asarray(target), eps=0.0)) == pytest.approx(expected)
    assert float(losses.soft_dice_loss(jnp.asarray(target), jnp.asarray(target))) == pytest.approx(0.0, abs=1e-6)
