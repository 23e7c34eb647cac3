"""Loss functions of both phases, as pure functions of arrays (testable by hand).

CMFT (section 3.1): least-squares adversarial losses (Eq. 2-3) and the L1 cycle loss (Eq. 4),
combined as Eq. 6 with weight lambda. In the least-squares GAN the discriminator minimises
``(D(real) - 1)^2 + D(fake)^2`` (the "max over D" of Eq. 5 written as a minimisation) and the
generator minimises ``(D(fake) - 1)^2``.

CMFF (section 3.2): the soft Dice loss of V-Net (Eq. 8), summed over the branches (Eq. 7).

Which function is which equation:

- ``lsgan_discriminator_loss``: Eq. 2 / Eq. 3, one discriminator's side.
- ``lsgan_generator_loss``: the generator's side of Eq. 2 / Eq. 3.
- ``l1_loss``: one term of Eq. 4 (or of the optional identity loss).
- ``cycle_loss``: Eq. 4.
- ``cmft_generator_loss``: the generators' side of Eq. 5, i.e. Eq. 6 (+ optional identity term).
- ``self_reconstruction_generator_loss``: the Ours_self variant of Eq. 6 (L1 self-reconstruction for Eq. 4).
- ``cmft_discriminator_loss``: the discriminators' side of Eq. 5, Eq. 2 + Eq. 3 on stop-gradient fakes.
- ``soft_dice_loss``: Eq. 8, over classes or over the BraTS regions WT, TC, ET (``config.model.output="regions"``,
  not in the paper: nnU-Net's region-based BraTS training).
- ``cmff_segmentation_loss``: Eq. 7 (+ optional cross-entropy), over classes or regions.

The CMFT functions take the generators and discriminators as callables ``x -> y`` (e.g. a
``functools.partial`` of a Flax ``apply``), so they know nothing of Flax.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Net = Callable[[jax.Array], jax.Array]


def lsgan_discriminator_loss(d_real: jax.Array, d_fake: jax.Array) -> jax.Array:
    """Eq. 2/3 for the discriminator: ``E[(D(real) - 1)^2] + E[D(fake)^2]``."""
    return jnp.mean(jnp.square(d_real - 1.0)) + jnp.mean(jnp.square(d_fake))


def lsgan_generator_loss(d_fake: jax.Array) -> jax.Array:
    """The generator's side of Eq. 2/3: ``E[(D(G(x)) - 1)^2]`` (fool the discriminator)."""
    return jnp.mean(jnp.square(d_fake - 1.0))


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute difference: one term of the cycle loss (Eq. 4) or of the identity loss."""
    return jnp.mean(jnp.abs(x - y))


def cycle_loss(a: jax.Array, rec_a: jax.Array, b: jax.Array, rec_b: jax.Array) -> jax.Array:
    """Eq. 4: ``E|G_BA(G_AB(A)) - A| + E|G_AB(G_BA(B)) - B|``, given the reconstructions ``rec_a``, ``rec_b``."""
    return l1_loss(rec_a, a) + l1_loss(rec_b, b)


def cmft_generator_loss(g_ab: Net, g_ba: Net, d_a: Net, d_b: Net, a: jax.Array, b: jax.Array,
                        lambda_cycle: float, identity_weight: float = 0.0
                        ) -> tuple[jax.Array, dict, tuple[jax.Array, jax.Array]]:
    """Eq. 6, the generators' side of Eq. 5: D_B judges G_AB(A), D_A judges G_BA(B), plus lambda x Eq. 4.

    With ``identity_weight > 0`` adds ``identity_weight * (|G_AB(B) - B| + |G_BA(A) - A|)`` (CycleGAN's
    identity loss, not in the paper). Returns ``(total, terms, (fake_a, fake_b))``; the fakes still carry
    gradient, and ``cmft_discriminator_loss`` stops it.
    """
    fake_b, fake_a = g_ab(a), g_ba(b)
    rec_a, rec_b = g_ba(fake_b), g_ab(fake_a)
    recon = cycle_loss(a, rec_a, b, rec_b)  # Eq. 4
    adv = lsgan_generator_loss(d_b(fake_b)) + lsgan_generator_loss(d_a(fake_a))
    total = adv + lambda_cycle * recon  # Eq. 6
    terms = {"g_adv": adv, "cycle": recon}
    if identity_weight > 0:
        identity = l1_loss(g_ab(b), b) + l1_loss(g_ba(a), a)
        total = total + identity_weight * identity
        terms["identity"] = identity
    terms["g_total"] = total
    return total, terms, (fake_a, fake_b)


def self_reconstruction_generator_loss(g_aa: Net, g_bb: Net, d_a: Net, d_b: Net, a: jax.Array, b: jax.Array,
                                       lambda_cycle: float
                                       ) -> tuple[jax.Array, dict, tuple[jax.Array, jax.Array]]:
    """Ours_self: Eq. 6 with G_AA, G_BB self-reconstructing their own modality, the L1 to the input for Eq. 4.

    Returns ``(total, terms, (fake_a, fake_b))`` with ``fake_a = G_AA(A)``, ``fake_b = G_BB(B)``.
    """
    fake_a, fake_b = g_aa(a), g_bb(b)
    recon = l1_loss(fake_a, a) + l1_loss(fake_b, b)
    adv = lsgan_generator_loss(d_b(fake_b)) + lsgan_generator_loss(d_a(fake_a))
    total = adv + lambda_cycle * recon
    return total, {"g_adv": adv, "recon": recon, "g_total": total}, (fake_a, fake_b)


def cmft_discriminator_loss(d_a: Net, d_b: Net, a: jax.Array, b: jax.Array, fake_a: jax.Array, fake_b: jax.Array
                            ) -> tuple[jax.Array, dict]:
    """Eq. 2 (D_B on B, fake B) + Eq. 3 (D_A on A, fake A), the discriminators' side of Eq. 5.

    The fakes pass through ``jax.lax.stop_gradient`` so that this loss never sends gradient into the
    generators. Returns ``(total, {"d_a": eq3, "d_b": eq2})``.
    """
    fake_a, fake_b = jax.lax.stop_gradient(fake_a), jax.lax.stop_gradient(fake_b)
    loss_db = lsgan_discriminator_loss(d_b(b), d_b(fake_b))  # Eq. 2
    loss_da = lsgan_discriminator_loss(d_a(a), d_a(fake_a))  # Eq. 3
    return loss_db + loss_da, {"d_a": loss_da, "d_b": loss_db}


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


def cmff_segmentation_loss(logits: dict, target: jax.Array, ce_weight: float = 0.0, output: str = "classes"
                           ) -> tuple[jax.Array, dict]:
    """Eq. 7: the sum over the branches S_A, S_B, S_F that ran of Eq. 8 [+ ``ce_weight`` x cross-entropy].

    ``logits`` is the CMFF model's output dict (``logits_a``, ``logits_b``, ``logits_f``; a branch that did
    not run is ``None`` and is skipped). ``output="classes"``: ``target`` is one-hot, Eq. 8 on the softmax,
    softmax cross-entropy; ``"regions"``: ``target`` holds the WT, TC, ET masks, :func:`soft_dice_loss` over
    the regions on the sigmoids, binary cross-entropy per region. Returns ``(total, terms)`` with ``dice_loss_{k}`` [and
    ``ce_{k}``].
    """
    regions = output == "regions"
    terms = {}
    for k in ("a", "b", "f"):
        branch = logits[f"logits_{k}"]
        if branch is None:
            continue
        if regions:
            terms[f"dice_loss_{k}"] = soft_dice_loss(jax.nn.sigmoid(branch), target)  # Eq. 8 per region
        else:
            terms[f"dice_loss_{k}"] = soft_dice_loss(jax.nn.softmax(branch), target)
        if ce_weight:
            ce = optax.sigmoid_binary_cross_entropy if regions else optax.softmax_cross_entropy
            terms[f"ce_{k}"] = ce_weight * jnp.mean(ce(branch, target))
    return sum(terms.values()), terms
