"""The one place a config's ``model`` block becomes Flax modules and their params.

Every job and experiment builds its networks here, so the generators of CMFT, the branches of CMFF,
prediction, export and the benchmarks cannot drift apart. Params come from example inputs of the
smallest size the network takes (conv params do not depend on the input size), without compiling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cmfl_jax.models.cmff import CMFFNet
from cmfl_jax.models.discriminator import PatchDiscriminator
from cmfl_jax.models.init import init_params
from cmfl_jax.models.unet import UNet3D

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PAIR_CHANNELS = 2  # every network input is one modality pair
DISCRIMINATOR_INPUT = 32  # Table 1's five 4^3 convs need at least 32^3


def generator(model: ml_collections.ConfigDict) -> UNet3D:
    """A CMFT generator (pair -> pair, linear output): G_AB, G_BA, G_AA or G_BB."""
    return UNet3D(out_channels=PAIR_CHANNELS, base=model.base, depth=model.depth, dtype=DTYPES[model.dtype],
                  conv_impl=model.conv_impl)


def discriminator(model: ml_collections.ConfigDict) -> PatchDiscriminator:
    """A CMFT discriminator (Table 1's 3D PatchGAN): D_A or D_B."""
    return PatchDiscriminator(dtype=DTYPES[model.dtype], conv_impl=model.conv_impl)


def cmff_net(model: ml_collections.ConfigDict, num_classes: int = 4) -> CMFFNet:
    """The CMFF segmentation network of the configured variant (``branches``, ``attention``, ``output``; a run
    from before ``output`` existed has the paper's 4 classes) with ``num_classes`` classes (its label set's:
    :func:`cmfl_jax.label_sets.run_label_set`)."""
    return CMFFNet(branches=model.branches, attention=model.attention, output=model.get("output", "classes"),
                   num_classes=num_classes, base=model.base, depth=model.depth, conv_impl=model.conv_impl,
                   dtype=DTYPES[model.dtype])


def example_inputs(module: nn.Module) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract inputs of batch 1 that ``module`` accepts: ``(a, b)`` for CMFFNet, one pair otherwise."""
    if isinstance(module, PatchDiscriminator):
        size = DISCRIMINATOR_INPUT
    else:
        size = 2**module.depth
    x = jax.ShapeDtypeStruct((1, size, size, size, PAIR_CHANNELS), jnp.float32)
    return (x, x) if isinstance(module, CMFFNet) else (x,)


def random_params(module: nn.Module, rng: jax.Array) -> dict:
    """Freshly initialised params (:func:`cmfl_jax.models.init.init_params`: traced, never compiled)."""
    return init_params(module, rng, *example_inputs(module))


def abstract_params(module: nn.Module) -> dict:
    """The params tree as ``ShapeDtypeStruct`` leaves: the target a checkpoint is restored onto."""
    return jax.eval_shape(module.init, jax.random.key(0), *example_inputs(module))["params"]
