"""U-Net and PatchGAN: Table 1 shapes, parameter count, feature shapes, exact fast convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.errors import CMFLError
from cmfl_jax.models import Conv3D, PatchDiscriminator, UNet3D, UpConv3D

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks


def test_table1_shapes_and_param_count_at_128():
    d = PatchDiscriminator(conv_impl="native")
    x = jax.ShapeDtypeStruct((1, 128, 128, 128, 2), jnp.float32)
    variables = jax.eval_shape(d.init, jax.random.key(0), x)
    (out, state) = jax.eval_shape(lambda v, x: d.apply(v, x, mutable=["intermediates"]), variables, x)
    shapes = {k: v[0].shape for k, v in state["intermediates"].items()}
    assert shapes == {"L1": (1, 64, 64, 64, 16), "L3": (1, 32, 32, 32, 32), "L6": (1, 16, 16, 16, 64),
                      "L9": (1, 8, 8, 8, 128), "L12": (1, 7, 7, 7, 1)}
    assert out.shape == (1, 7, 7, 7, 1)
    convs = [(2, 16), (16, 32), (32, 64), (64, 128), (128, 1)]
    expected = sum(4**3 * i * o + o for i, o in convs) + 2 * (32 + 64 + 128)  # + InstanceNorm scale and bias
    assert expected == 699057
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == expected


@pytest.mark.parametrize("depth", [2, 3])
def test_unet_output_and_feature_shapes(depth):
    net = UNet3D(out_channels=4, base=4, depth=depth, conv_impl="native")
    x = jax.ShapeDtypeStruct((2, 32, 16, 24, 2) if depth == 2 else (1, 16, 32, 16, 2), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    out, (f1, f2) = jax.eval_shape(net.apply, variables, x)
    spatial = x.shape[1:4]
    assert out.shape == (x.shape[0], *spatial, 4) and out.dtype == jnp.float32
    assert f1.shape == f2.shape == (x.shape[0], *spatial, 4)
    assert variables["params"]["head"]["kernel"].shape == (1, 1, 1, 4, 4)
    assert variables["params"][f"enc_{depth - 1}"]["conv_0"]["kernel"].shape[-1] == 4 * 2 ** (depth - 1)
    assert variables["params"]["bottleneck"]["conv_1"]["kernel"].shape[-1] == 4 * 2**depth


def test_generator_and_segmentation_trees_differ_only_in_head():
    x = jax.ShapeDtypeStruct((1, 16, 16, 16, 2), jnp.float32)
    gen = jax.eval_shape(UNet3D(2, base=4, depth=2).init, jax.random.key(0), x)["params"]
    seg = jax.eval_shape(UNet3D(4, base=4, depth=2).init, jax.random.key(0), x)["params"]
    strip = lambda p: jax.tree.map(lambda a: a.shape, {k: v for k, v in p.items() if k != "head"})
    assert strip(gen) == strip(seg)
    assert gen["head"]["kernel"].shape != seg["head"]["kernel"].shape


def test_bad_input_size_is_a_clear_error():
    with pytest.raises(CMFLError, match=r"input size \(18, 16, 16\) is not a multiple of 2\*\*depth = 4"):
        UNet3D(2, base=4, depth=2).init(jax.random.key(0), jnp.zeros((1, 18, 16, 16, 2)))


@pytest.mark.parametrize("module", [Conv3D(5), Conv3D(4), Conv3D(3, kernel_size=1, padding=0), UpConv3D(5),
                                    UpConv3D(4), Conv3D(1, kernel_size=7, padding=3)],
                         ids=["conv3_odd", "conv3_even", "conv1", "up_odd", "up_even", "conv7_cbam"])
@pytest.mark.parametrize("cin", [3, 4])
def test_cpu_fast_equals_native_forward_and_gradient(module, cin):
    x = jax.random.normal(jax.random.key(0), (2, 6, 8, 4, cin))
    params = module.init(jax.random.key(1), x)

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(module.clone(conv_impl=impl).apply(p, x)))

    for argnums in (0, 1):
        g_native = jax.grad(loss, argnums)(params, x, "native")
        g_fast = jax.grad(loss, argnums)(params, x, "cpu_fast")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_native, g_fast)
    np.testing.assert_allclose(module.clone(conv_impl="native").apply(params, x),
                               module.clone(conv_impl="cpu_fast").apply(params, x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_unet_impls_share_params_and_agree():
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 2))
    native, fast = UNet3D(4, base=4, depth=2, conv_impl="native"), UNet3D(4, base=4, depth=2, conv_impl="cpu_fast")
    params = native.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(fast.init(jax.random.key(1), x))
    np.testing.assert_allclose(native.apply(params, x)[0], fast.apply(params, x)[0], rtol=1e-4, atol=1e-4)


def unet_param_shapes(cin: int, out: int, base: int) -> dict:
    """The param tree of a depth-2 ``UNet3D``, written out by hand (Fig. 3: two levels, then the bottleneck)."""
    conv = lambda k, i, o: {"kernel": (k, k, k, i, o), "bias": (o,)}
    norm = lambda c: {"scale": (c,), "bias": (c,)}
    block = lambda i, c: {"conv_0": conv(3, i, c), "norm_0": norm(c), "conv_1": conv(3, c, c), "norm_1": norm(c)}
    b = base
    return {
        "enc_0": block(cin, b), "enc_1": block(b, 2 * b), "bottleneck": block(2 * b, 4 * b),
        "up_1": conv(2, 4 * b, 2 * b), "dec_1": block(4 * b, 2 * b),  # up-sampled 2b + skip 2b channels in
        "up_0": conv(2, 2 * b, b), "dec_0": block(2 * b, b),
        "head": conv(1, b, out),
    }


@pytest.mark.slow
def test_bfloat16_compute_with_float32_params():
    net = UNet3D(2, base=4, depth=2, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 2))
    params = net.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert jax.tree.map(lambda p: p.shape, params["params"]) == unet_param_shapes(2, 2, 4)
    # enc 220+8+436+8, 872+16+1736+16; bottleneck 3472+32+6928+32; up 1032, 260; dec 3464+16+1736+16,
    # 868+8+436+8; head 10.
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 21630
    out, (f1, f2) = net.apply(params, x)
    assert out.shape == (1, 16, 16, 16, 2) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert f1.shape == f2.shape == (1, 16, 16, 16, 4)
    assert f1.dtype == f2.dtype == jnp.bfloat16  # the features are computed in bfloat16
    # The same params in float32 give nearly the same output (bfloat16 keeps ~3 significant digits), not the same.
    out32, _ = jax.jit(UNet3D(2, base=4, depth=2).apply)(params, x)
    err = float(jnp.linalg.norm(out - out32) / jnp.linalg.norm(out32))
    assert 0.0 < err < 0.05, err
