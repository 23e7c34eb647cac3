"""init_params: the tree of module.init without compiling the network, from the same distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cmfl_jax.models import CMFFNet, UNet3D, init_params


def test_same_tree_shapes_and_dtypes_as_module_init():
    model = CMFFNet(base=2, depth=1, attention="cbam", conv_impl="native")
    x = jnp.zeros((1, 2, 2, 2, 2))
    reference = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x, x)["params"])
    params = traverse_util.flatten_dict(init_params(model, jax.random.key(0), x, x))
    assert params.keys() == reference.keys()
    for path, ref in reference.items():
        assert (params[path].shape, params[path].dtype) == (ref.shape, ref.dtype), path


def test_values_follow_the_declared_initializers_and_the_key():
    model = UNet3D(4, base=16, depth=2)
    x = jax.ShapeDtypeStruct((1, 4, 4, 4, 2), jnp.float32)
    params = init_params(model, jax.random.key(0), x)
    kernel = np.asarray(params["bottleneck"]["conv_1"]["kernel"])  # (3, 3, 3, 64, 64): fan_in 1728
    fan_in = 27 * 64
    assert abs(kernel.std() * np.sqrt(fan_in) - 1.0) < 0.02  # lecun normal: variance 1 / fan_in
    assert np.abs(kernel).max() * np.sqrt(fan_in) <= 2.0 / 0.87962566103423978 + 1e-5  # truncated at 2 sigma
    assert not np.any(params["bottleneck"]["conv_1"]["bias"])
    np.testing.assert_array_equal(params["bottleneck"]["norm_1"]["scale"], 1.0)
    again = init_params(model, jax.random.key(0), x)
    other = init_params(model, jax.random.key(1), x)
    np.testing.assert_array_equal(again["head"]["kernel"], params["head"]["kernel"])
    assert not np.array_equal(other["head"]["kernel"], params["head"]["kernel"])
