"""Loss functions of both phases, as pure functions of arrays (testable by hand).

CMFT (section 3.1): least-squares adversarial losses (Eq. 2-3) and the L1 cycle loss (Eq. 4),
combined as Eq. 6 with weight lambda. In the least-squares GAN the discriminator minimises
``(D(real) - 1)^2 + D(fake)^2`` (the "max over D" of Eq. 5 written as a minimisation) and the
generator minimises ``(D(fake) - 1)^2``.

CMFF (section 3.2): the soft Dice loss of V-Net (Eq. 8), summed over the branches (Eq. 7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lsgan_discriminator_loss(d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
    """Eq. 2/3 for the discriminator: ``E[(D(real) - 1)^2] + E[D(fake)^2]``."""
    return jnp.mean(jnp.square(d_real - 1.0)) + jnp.mean(jnp.square(d_fake))


def lsgan_generator_loss(d_fake: jax.Array) -> jax.Array:
    """The generator's side of Eq. 2/3: ``E[(D(G(x)) - 1)^2]`` (fool the discriminator)."""
    return jnp.mean(jnp.square(d_fake - 1.0))


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute difference: one term of the cycle loss (Eq. 4) or of the identity loss."""
    return jnp.mean(jnp.abs(x - y))


def soft_dice_loss(probs: jax.Array, target_onehot: jax.Array, eps: float = 1e-5) -> jax.Array:
    """V-Net soft Dice loss (Eq. 8), ``1 - mean_c 2|Y_c P_c| / (|Y_c| + |P_c|)``.

    Args:
      probs: ``(N, D, H, W, C)`` probabilities.
      target_onehot: same shape, one-hot (or soft) targets.
    The sums run over the batch and all voxels per channel; the result is the mean over channels.
    """
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(probs * target_onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(target_onehot, axis=axes)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return 1.0 - jnp.mean(dice)
