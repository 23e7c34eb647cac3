"""A PyTorch twin of :class:`cmfl_jax.models.UNet3D`, the comparator of ``experiments/benchmark.py``.

Same architecture layer for layer (channels first ``(N, C, D, H, W)``, as PyTorch wants): per level two
(3^3 conv, padding 1 + InstanceNorm(affine, eps 1e-6 as flax's default) + LeakyReLU(0.01)), 2^3 max-pool,
filters doubled per level, a bottleneck block, 2^3 stride-2 transposed-conv up-sampling, concatenation
``[up, skip]`` in that order, a decoder block and a final 1^3 conv. Modules carry the flax names
(``enc_0.conv_1``, ``up_2``, ``head``), so :func:`load_flax_params` copies a flax param tree in by name and
a test can check the two forwards agree: a speed comparison is only fair between equal computations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.01
NORM_EPS = 1e-6  # flax.linen.InstanceNorm's default epsilon


class ConvBlock(nn.Module):
    """Two (3^3 conv + InstanceNorm + LeakyReLU), as ``cmfl_jax.models.unet.ConvBlock`` (names included)."""

    def __init__(self, in_channels: int, features: int) -> None:
        super().__init__()
        self.conv_0 = nn.Conv3d(in_channels, features, 3, padding=1)
        self.norm_0 = nn.InstanceNorm3d(features, eps=NORM_EPS, affine=True)
        self.conv_1 = nn.Conv3d(features, features, 3, padding=1)
        self.norm_1 = nn.InstanceNorm3d(features, eps=NORM_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm_0(self.conv_0(x)), LEAKY_SLOPE)
        return F.leaky_relu(self.norm_1(self.conv_1(x)), LEAKY_SLOPE)


class TorchUNet3D(nn.Module):
    """The U-Net of ``cmfl_jax.models.UNet3D`` in PyTorch; returns the logits only (the benchmark needs no features).

    Args:
      in_channels: input channels (2: a modality pair).
      out_channels: output channels (4 classes for the segmentation branch).
      base: filters of the first level; depth: number of down-samplings.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 4, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.depth = depth
        layers: dict[str, nn.Module] = {}
        channels = in_channels
        for level in range(depth):
            layers[f"enc_{level}"] = ConvBlock(channels, base * 2**level)
            channels = base * 2**level
        layers["bottleneck"] = ConvBlock(channels, base * 2**depth)
        channels = base * 2**depth
        for level in reversed(range(depth)):
            features = base * 2**level
            layers[f"up_{level}"] = nn.ConvTranspose3d(channels, features, 2, stride=2)
            layers[f"dec_{level}"] = ConvBlock(2 * features, features)  # input: [up, skip]
            channels = features
        layers["head"] = nn.Conv3d(channels, out_channels, 1)
        self.layers = nn.ModuleDict(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in range(self.depth):
            x = self.layers[f"enc_{level}"](x)
            skips.append(x)
            x = F.max_pool3d(x, 2, 2)
        x = self.layers["bottleneck"](x)
        for level in reversed(range(self.depth)):
            x = self.layers[f"up_{level}"](x)
            x = self.layers[f"dec_{level}"](torch.cat([x, skips[level]], dim=1))
        return self.layers["head"](x)


def soft_dice_loss(probs: torch.Tensor, target_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``cmfl_jax.losses.soft_dice_loss`` for channels-first tensors: sums over batch and voxels per channel."""
    axes = (0, *range(2, probs.ndim))
    intersection = torch.sum(probs * target_onehot, dim=axes)
    denominator = torch.sum(probs, dim=axes) + torch.sum(target_onehot, dim=axes)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return 1.0 - torch.mean(dice)


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters (to compare with the flax tree's)."""
    return sum(p.numel() for p in model.parameters())


def _torch_value(module: nn.Module, key: str, value: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The torch parameter a flax leaf ``key`` of ``module`` maps to, and the leaf in torch's layout."""
    if key == "bias":
        return module.bias, value
    if isinstance(module, nn.InstanceNorm3d) and key == "scale":
        return module.weight, value
    if isinstance(module, nn.ConvTranspose3d) and key == "kernel":
        # flax (i, j, l, C_in, C_out) with out[2d+i] = sum_c x[d, c] K[i, c] -> torch (C_in, C_out, i, j, l):
        # torch's transposed conv writes x[d] W[:, :, i] to out[2d+i] too, so no flip.
        return module.weight, value.transpose(3, 4, 0, 1, 2)
    if isinstance(module, nn.Conv3d) and key == "kernel":
        # DHWIO -> OIDHW; both are cross-correlations, so no flip.
        return module.weight, value.transpose(4, 3, 0, 1, 2)
    raise KeyError(f"no torch parameter for flax leaf {key!r} of {type(module).__name__}")


def load_flax_params(model: TorchUNet3D, params: Mapping[str, Any]) -> None:
    """Copy a ``UNet3D`` flax param tree into ``model`` in place; fails loudly on a missing leaf or a shape mismatch."""
    copied = set()
    with torch.no_grad():
        for name, module in model.layers.named_modules():
            if not isinstance(module, nn.Conv3d | nn.ConvTranspose3d | nn.InstanceNorm3d):
                continue
            tree: Any = params
            for part in name.split("."):
                tree = tree[part]
            for key, leaf in tree.items():
                target, value = _torch_value(module, key, np.asarray(leaf, np.float32))
                if tuple(target.shape) != value.shape:
                    raise ValueError(f"{name}.{key}: flax {value.shape} (torch layout) != torch {tuple(target.shape)}")
                target.copy_(torch.from_numpy(np.array(value, np.float32)))  # a writable copy
                copied.add(id(target))
    missing = [n for n, p in model.named_parameters() if id(p) not in copied]
    if missing:
        raise ValueError(f"torch parameters without a flax leaf: {missing}")
    if len(copied) != _count_leaves(params):
        raise ValueError(f"flax tree has {_count_leaves(params)} leaves, {len(copied)} copied into torch")


def _count_leaves(tree: Any) -> int:
    return sum(_count_leaves(v) for v in tree.values()) if isinstance(tree, Mapping) else 1
