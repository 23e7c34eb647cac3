"""Networks of the method (flax.linen, channels last ``(N, D, H, W, C)``)."""

from cmfl_jax.models.cmff import CMFFNet
from cmfl_jax.models.conv import Conv3D, UpConv3D, resolve_conv_impl
from cmfl_jax.models.discriminator import PatchDiscriminator
from cmfl_jax.models.fusion import FusionBranch
from cmfl_jax.models.init import init_params
from cmfl_jax.models.unet import UNet3D

__all__ = [
    "CMFFNet", "Conv3D", "FusionBranch", "PatchDiscriminator", "UNet3D", "UpConv3D", "init_params", "resolve_conv_impl",
]
