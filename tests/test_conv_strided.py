"""The ``cpu_fast`` strided (space-to-depth) and even-kernel convs equal XLA's native op, forward and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.models import Conv3D, PatchDiscriminator
from cmfl_jax.models import conv as conv_module

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks


def _assert_same_forward_and_gradients(module, x):
    """Forward, and gradient w.r.t. params and input, of native vs cpu_fast; returns the cpu_fast output."""
    params = module.init(jax.random.key(1), x)
    results = {}
    for impl in ("native", "cpu_fast"):
        m = module.clone(conv_impl=impl)
        y, vjp = jax.jit(lambda p, x, m=m: jax.vjp(m.apply, p, x))(params, x)
        results[impl] = (y, jax.jit(vjp)(jnp.cos(y)))  # the gradient of sum(sin(y))
    (y_native, g_native), (y_fast, g_fast) = results["native"], results["cpu_fast"]
    assert y_native.shape == y_fast.shape
    np.testing.assert_allclose(y_fast, y_native, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4), g_native, g_fast)
    return y_fast


# (input shape N, D, H, W; C_in; C_out; kernel; stride; padding)
STRIDED = [
    ((1, 9, 9, 9), 3, 5, 4, 2, 1),  # the discriminator's conv, odd size, odd channels
    ((2, 10, 10, 10), 4, 4, 4, 2, 1),  # even size, even channels
    ((1, 16, 9, 10), 2, 3, 4, 2, 1),  # mixed sizes per axis
    ((1, 9, 10, 16), 3, 4, 3, 2, 1),  # odd kernel: zero-padded to 4 before space-to-depth
    ((1, 10, 9, 10), 3, 2, 2, 2, 0),  # kernel == stride: space-to-depth + a 1^3 conv
    ((1, 11, 10, 9), 2, 3, 5, 3, 2),  # stride 3, kernel not a multiple of it
]


@pytest.mark.parametrize("matmul_min", [0, 10**9], ids=["matmul", "as2d"])
@pytest.mark.parametrize(("shape", "cin", "cout", "k", "s", "p"), STRIDED,
                         ids=["k4s2_odd", "k4s2_even", "k4s2_mixed", "k3s2", "k2s2", "k5s3"])
def test_strided_cpu_fast_equals_native(monkeypatch, matmul_min, shape, cin, cout, k, s, p):
    # Both stride-1 back ends after space-to-depth: the matrix product and the 2D-conv sum.
    monkeypatch.setattr(conv_module, "MATMUL_MIN_CHANNELS", matmul_min)
    monkeypatch.setattr(conv_module, "MATMUL_MIN_VOXELS", matmul_min)
    x = jax.random.normal(jax.random.key(0), (*shape, cin))
    module = Conv3D(cout, kernel_size=k, strides=s, padding=p)
    out = _assert_same_forward_and_gradients(module, x)
    assert out.shape == (shape[0], *((size + 2 * p - k) // s + 1 for size in shape[1:]), cout)


@pytest.mark.parametrize("shape", [(1, 6, 7, 8), (2, 5, 5, 5)], ids=["mixed", "odd"])
def test_even_kernel_stride1_cpu_fast_equals_native(shape):
    """The discriminator's last layer: 4^3, stride 1, padding 1 (one voxel smaller per axis)."""
    x = jax.random.normal(jax.random.key(0), (*shape, 5))
    _assert_same_forward_and_gradients(Conv3D(1, kernel_size=4, strides=1, padding=1), x)
    _assert_same_forward_and_gradients(Conv3D(2, kernel_size=2, strides=1, padding=0), x)


@pytest.mark.slow
def test_patch_discriminator_impls_agree():
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 32, 2))
    module = PatchDiscriminator()
    params = module.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, module.clone(conv_impl="native").init(jax.random.key(1), x))
    out = _assert_same_forward_and_gradients(module, x)
    assert out.shape == (1, 1, 1, 1, 1)
