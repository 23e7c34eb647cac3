"""The GPU and TPU programs lower on this CPU-only machine, with XLA's native 3D convolution in them.

``conv_impl="auto"`` (what the configs use) stages both conv paths and lets the lowering platform choose
(:mod:`cmfl_jax.models.conv`): lowered for ``cuda`` or ``tpu``, the CMFT step, the CMFF step and the inference
function must hold 3D ``stablehlo.convolution`` ops and none of ``cpu_fast``'s 2D ones; lowered for ``cpu``, the
reverse (which shows the check can fail): ``cpu_fast``'s 2D ones, or, where ``auto`` runs oneDNN on the CPU
(the library is built, :mod:`cmfl_jax.models.onednn`), its custom call and no 3D convolution. A CPU-only
construct reaching a GPU/TPU code path, or a platform choice made by asking the machine
(``jax.default_backend()``), fails here. Lowering only, nothing is compiled.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.inference.sliding_window import cmff_predict_fn
from cmfl_jax.models import Conv3D, builder
from cmfl_jax.models.conv import resolve_conv_impl
from cmfl_jax.training import cmff_step, cmft_step

# The lhs layout of each convolution: ``[b, 0, 1, 2, f]`` (3 spatial dims) or ``[b, 0, 1, f]`` (2D), or their
# permutations in the gradients.
_CONV = re.compile(r"stablehlo\.convolution.*?dim_numbers = \[([^\]]*)\]")


def conv_ranks(text: str) -> collections.Counter:
    """``{spatial rank: number of stablehlo.convolution ops}`` of a lowered module's text."""
    return collections.Counter(len(re.findall(r"\d", lhs)) for lhs in _CONV.findall(text))


def assert_the_cpu_path(text: str) -> None:
    """``auto``'s CPU branch: oneDNN's custom call where the library is loaded, else cpu_fast's 2D convolutions."""
    ranks = conv_ranks(text)
    if resolve_conv_impl("auto", "cpu") == "onednn":
        assert "cmfl_onednn_conv_fwd" in text and 3 not in ranks, ranks
    else:
        assert ranks[2] > 0 and set(ranks) == {2}, ranks


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), tree)


@pytest.fixture(scope="module")
def traced():
    """``{name: jax.stages.Traced}`` of the three programs at smoke sizes (configs' ``:smoke``, conv_impl auto)."""
    out = {}
    config = load_config("cmft:smoke")
    assert config.model.conv_impl == "auto"
    image = jax.ShapeDtypeStruct((config.train.batch_size, *config.data.patch_size, 4), jnp.float32)
    states = abstract(cmft_step.create_states(jax.random.key(0), config))
    out["cmft_step"] = cmft_step.make_train_step(config).trace(states, {"image": image})

    config = load_config("cmff:smoke")
    assert config.model.conv_impl == "auto"
    label = jax.ShapeDtypeStruct(image.shape[:-1], jnp.uint8)
    states = {"seg": abstract(cmff_step.create_state(jax.random.key(0), config, resuming=True))}
    out["cmff_step"] = cmff_step.make_train_step(config).trace(states, {"image": image, "label": label})

    model = builder.cmff_net(config.model)
    window = jax.ShapeDtypeStruct((1, *config.data.patch_size, 4), jnp.float32)
    out["inference"] = cmff_predict_fn(model, config.data.pairing).trace(builder.abstract_params(model), window)
    return out


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("program", ["cmft_step", "cmff_step", "inference"])
def test_gpu_and_tpu_programs_use_the_native_3d_convolution(traced, program, platform):
    ranks = conv_ranks(traced[program].lower(lowering_platforms=(platform,)).as_text())
    assert ranks[3] > 0 and set(ranks) == {3}, ranks


@pytest.mark.parametrize("program", ["cmft_step", "inference"])
def test_the_cpu_program_is_the_cpu_fast_one(traced, program):
    """The same traced program lowered for CPU: only the CPU path (cpu_fast or oneDNN), the 3D branch dropped."""
    assert_the_cpu_path(traced[program].lower(lowering_platforms=("cpu",)).as_text())


def test_one_program_for_several_platforms_carries_both_paths():
    conv = Conv3D(3, kernel_size=3, conv_impl="auto")
    x = jax.ShapeDtypeStruct((1, 8, 8, 8, 2), jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.key(0), x)
    text = jax.jit(conv.apply).trace(params, x).lower(lowering_platforms=("cpu", "cuda", "tpu")).as_text()
    onednn = resolve_conv_impl("auto", "cpu") == "onednn"
    assert set(conv_ranks(text)) == ({3} if onednn else {2, 3})
    assert ("cmfl_onednn_conv_fwd" in text) == onednn
    for impl, rank in (("native", 3), ("cpu_fast", 2)):  # the fixed choices ignore the platform
        text = jax.jit(conv.clone(conv_impl=impl).apply).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
        assert set(conv_ranks(text)) == {rank}
