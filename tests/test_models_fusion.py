"""The fusion branch's attention variants and every CMFFNet branches x attention combination."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax.models import CMFFNet, FusionBranch, UNet3D


def fusion_inputs(seed=0, shape=(1, 8, 8, 8)):
    ks = jax.random.split(jax.random.key(seed), 6)
    feats_a = (jax.random.normal(ks[0], (*shape, 4)), jax.random.normal(ks[1], (*shape, 4)))
    feats_b = (jax.random.normal(ks[2], (*shape, 4)), jax.random.normal(ks[3], (*shape, 4)))
    probs_a = jax.nn.softmax(3 * jax.random.normal(ks[4], (*shape, 4)))
    probs_b = jax.nn.softmax(3 * jax.random.normal(ks[5], (*shape, 4)))
    return feats_a, feats_b, probs_a, probs_b


def test_none_ignores_masks_and_mask_uses_them():
    fa, fb, pa, pb = fusion_inputs()
    _, _, pa2, pb2 = fusion_inputs(seed=1)
    none = FusionBranch(features=4, attention="none", conv_impl="native")
    mask = FusionBranch(features=4, attention="mask", conv_impl="native")
    params = none.init(jax.random.key(0), fa, fb, pa, pb)
    assert jax.tree.structure(params) == jax.tree.structure(mask.init(jax.random.key(0), fa, fb, pa, pb))
    np.testing.assert_array_equal(none.apply(params, fa, fb, pa, pb), none.apply(params, fa, fb, pa2, pb2))
    assert not np.allclose(mask.apply(params, fa, fb, pa, pb), mask.apply(params, fa, fb, pa2, pb2))
    assert not np.allclose(mask.apply(params, fa, fb, pa, pb), none.apply(params, fa, fb, pa, pb))
    # All-background masks (m = 0) make the mask-guided block the identity: "mask" equals "none".
    background = jnp.zeros_like(pa).at[..., 0].set(1.0)
    np.testing.assert_allclose(mask.apply(params, fa, fb, background, background),
                               none.apply(params, fa, fb, background, background), rtol=1e-6, atol=1e-6)


def inputs_of(module_name, apply_fn, *args):
    """Run ``apply_fn(*args)`` and return the input of the submodule ``module_name`` (seen by an interceptor)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.module.name == module_name and context.method_name == "__call__":
            seen.append(np.asarray(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        apply_fn(*args)
    assert len(seen) == 1, (module_name, len(seen))
    return seen[0]


def test_mask_guided_attention_is_f_plus_f_ma_plus_f_mb():
    """The features entering the last block are F + F * m_A + F * m_B, with m = 1 - p[background], by hand.

    F is what enters that block with ``attention="none"`` (same params, same features): the fused features
    unchanged. Masks are random and in (0, 1), so other formulas equal at m = 0 (F * (1 + m_A * m_B),
    F * (1 + (m_A + m_B) / 2), masks from the wrong channel or the wrong branch, ...) all differ.
    """
    fa, fb, pa, pb = fusion_inputs(seed=3, shape=(1, 4, 4, 4))
    none = FusionBranch(features=4, attention="none", conv_impl="native")
    mask = FusionBranch(features=4, attention="mask", conv_impl="native")
    params = mask.init(jax.random.key(0), fa, fb, pa, pb)
    f = inputs_of("out_conv", none.apply, params, fa, fb, pa, pb).astype(np.float64)
    got = inputs_of("out_conv", mask.apply, params, fa, fb, pa, pb)
    m_a = 1.0 - np.asarray(pa, np.float64)[..., :1]
    m_b = 1.0 - np.asarray(pb, np.float64)[..., :1]
    assert f.shape == got.shape == (1, 4, 4, 4, 4) and np.std(f) > 0.1
    assert 0.05 < m_a.mean() < 0.95 and 0.05 < m_b.mean() < 0.95 and np.std(m_a - m_b) > 0.05
    np.testing.assert_allclose(got, f + f * m_a + f * m_b, rtol=1e-5, atol=1e-6)


def test_cbam_has_its_own_params_and_ignores_masks():
    fa, fb, pa, pb = fusion_inputs()
    _, _, pa2, pb2 = fusion_inputs(seed=1)
    cbam = FusionBranch(features=4, attention="cbam", conv_impl="native")
    params = cbam.init(jax.random.key(0), fa, fb, pa, pb)
    assert {"ca_dense_0", "ca_dense_1", "sa_conv"} <= set(params["params"])
    # CBAM's own settings: reduction ratio 16 (at least 1 hidden unit) and a 7^3 spatial conv on [mean, max].
    shapes = jax.tree.map(lambda x: x.shape, params["params"])
    assert shapes["ca_dense_0"]["kernel"] == (4, 1) and shapes["ca_dense_1"]["kernel"] == (1, 4)
    assert shapes["sa_conv"]["kernel"] == (7, 7, 7, 2, 1)
    wide = jax.eval_shape(FusionBranch(features=64, attention="cbam", conv_impl="native").init, jax.random.key(0),
                          fa, fb, pa, pb)["params"]
    assert wide["ca_dense_0"]["kernel"].shape == (64, 4) and wide["ca_dense_1"]["kernel"].shape == (4, 64)
    np.testing.assert_array_equal(cbam.apply(params, fa, fb, pa, pb), cbam.apply(params, fa, fb, pa2, pb2))


@pytest.mark.parametrize("branches,attention", list(itertools.product(["fusion", "A", "B", "A+B"],
                                                                        ["mask", "cbam", "none"])))
def test_every_combination_runs(branches, attention):
    net = CMFFNet(branches=branches, attention=attention, base=4, depth=2, conv_impl="native")
    a, b = jnp.ones((1, 16, 16, 16, 2)), -jnp.ones((1, 16, 16, 16, 2))
    variables = jax.eval_shape(net.init, jax.random.key(0), a, b)
    out = jax.eval_shape(net.apply, variables, a, b)
    assert out["probs"].shape == (1, 16, 16, 16, 4)
    expected = {"fusion": {"S_A", "S_B", "S_F"}, "A": {"S_A"}, "B": {"S_B"}, "A+B": {"S_A", "S_B"}}[branches]
    assert set(variables["params"]) == expected
    assert (out["logits_f"] is not None) == (branches == "fusion")


def test_branch_trees_match_a_generator_but_for_the_head():
    a = jnp.ones((1, 16, 16, 16, 2))
    net = jax.eval_shape(CMFFNet(base=4, depth=2).init, jax.random.key(0), a, a)["params"]
    gen = jax.eval_shape(UNet3D(2, base=4, depth=2).init, jax.random.key(0), a)["params"]
    shapes = lambda p: jax.tree.map(lambda x: x.shape, {k: v for k, v in p.items() if k != "head"})
    assert shapes(net["S_A"]) == shapes(gen) == shapes(net["S_B"])


def test_a_plus_b_averages_softmax_and_probs_sum_to_one():
    net = CMFFNet(branches="A+B", base=4, depth=2, conv_impl="native")
    a = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 2))
    b = jax.random.normal(jax.random.key(2), (1, 16, 16, 16, 2))
    params = net.init(jax.random.key(0), a, b)
    out = net.apply(params, a, b)
    expected = 0.5 * (jax.nn.softmax(out["logits_a"]) + jax.nn.softmax(out["logits_b"]))
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_fusion_loss_reaches_the_branches_through_masks_and_features():
    """S_F's output depends on S_A's params along two paths, the fused features and (with "mask") the predicted
    masks: its gradient reaches S_A's head only through the mask m_A = 1 - p_A[background], so the head's gradient
    is zero with attention "none" and not with "mask" (docs/method.md, "Loss")."""
    x = jax.random.normal(jax.random.key(3), (1, 8, 8, 8, 2))

    def head_and_body_grads(attention):
        net = CMFFNet(attention=attention, base=4, depth=1, conv_impl="native")
        params = net.init(jax.random.key(0), x, x)["params"]
        grads = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x, x)["logits_f"] ** 2))(params)
        head = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["S_A"]["head"]))
        body = max(float(jnp.max(jnp.abs(g))) for k, v in grads["S_A"].items() if k != "head"
                   for g in jax.tree.leaves(v))
        return head, body

    head_none, body_none = head_and_body_grads("none")
    head_mask, body_mask = head_and_body_grads("mask")
    assert head_none == 0.0 and body_none > 0.0  # features only
    assert head_mask > 0.0 and body_mask > 0.0  # and the mask
