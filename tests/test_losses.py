"""Loss functions against values computed by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax import losses

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks


def test_lsgan_losses_by_hand():
    d_real = jnp.array([1.0, 0.5, 0.0])  # (0, 0.25, 1) -> mean 5/12
    d_fake = jnp.array([0.2, -0.4])  # (0.04, 0.16) -> mean 0.1
    assert float(losses.lsgan_discriminator_loss(d_real, d_fake)) == pytest.approx(5 / 12 + 0.1)
    assert float(losses.lsgan_generator_loss(d_fake)) == pytest.approx((0.64 + 1.96) / 2)


def test_l1_by_hand():
    x = jnp.array([[1.0, -2.0], [3.0, 0.0]])
    y = jnp.array([[0.0, 0.0], [1.0, 0.5]])
    assert float(losses.l1_loss(x, y)) == pytest.approx((1 + 2 + 2 + 0.5) / 4)


def test_soft_dice_by_hand():
    target = np.zeros((1, 2, 1, 1, 2), np.float32)
    target[0, 0, 0, 0, 1] = 1  # class 1 at voxel 0, class 0 at voxel 1
    target[0, 1, 0, 0, 0] = 1
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32).reshape(1, 2, 1, 1, 2)
    # class 0: 2*0.5 / (0.75 + 1) ; class 1: 2*0.75 / (1.25 + 1)
    expected = 1 - (2 * 0.5 / 1.75 + 2 * 0.75 / 2.25) / 2
    assert float(losses.soft_dice_loss(jnp.asarray(probs), jnp.asarray(target), eps=0.0)) == pytest.approx(expected)
    assert float(losses.soft_dice_loss(jnp.asarray(target), jnp.asarray(target))) == pytest.approx(0.0, abs=1e-6)


# CMFT objectives with linear "generators" and "discriminators" on tiny arrays. Shared case:
#   a = [1, 2], b = [0, 4], G_AB(x) = 2x, G_BA(x) = x/2 + 1, D_A = D_B = identity
#   fake_b = G_AB(a) = [2, 4]      fake_a = G_BA(b) = [1, 3]
#   rec_a = G_BA(fake_b) = [2, 3]  rec_b = G_AB(fake_a) = [2, 6]
#   Eq. 4: mean(|2-1|, |3-2|) + mean(|2-0|, |6-4|) = 1 + 2 = 3
#   generator adversarial: mean((2-1)^2, (4-1)^2) + mean((1-1)^2, (3-1)^2) = 5 + 2 = 7
A, B = jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])
G_AB = lambda x: 2.0 * x
G_BA = lambda x: 0.5 * x + 1.0
IDENT = lambda x: x
ADV, CYC = 7.0, 3.0


def _recorder(log: list, out):
    """A discriminator that records its inputs and returns ``out(x)``."""

    def d(x):
        log.append(np.asarray(x).tolist())
        return out(x)

    return d


def test_cycle_loss_by_hand():
    rec_a, rec_b = jnp.array([2.0, 3.0]), jnp.array([2.0, 6.0])
    assert float(losses.cycle_loss(A, rec_a, B, rec_b)) == pytest.approx(CYC)


def test_cmft_generator_loss_lambda_weights_cycle_term():
    totals = {}
    for lam in (1.0, 10.0):
        total, terms, (fake_a, fake_b) = losses.cmft_generator_loss(G_AB, G_BA, IDENT, IDENT, A, B, lam)
        assert float(total) == pytest.approx(ADV + lam * CYC)  # 10 and 37
        assert list(terms) == ["g_adv", "cycle", "g_total"]
        assert float(terms["g_adv"]) == pytest.approx(ADV)
        assert float(terms["cycle"]) == pytest.approx(CYC)
        assert float(terms["g_total"]) == float(total)
        np.testing.assert_allclose(fake_a, [1.0, 3.0])
        np.testing.assert_allclose(fake_b, [2.0, 4.0])
        totals[lam] = float(total)
    assert totals[10.0] - totals[1.0] == pytest.approx(9.0 * CYC)  # delta lambda x cycle = 27


def test_lsgan_targets_one_for_real_zero_for_fake():
    a, b = jnp.array([1.0, 2.0]), jnp.array([3.0, 0.5])
    neg = lambda x: -x  # fakes (and only fakes) are negative
    fake_a, fake_b = neg(b), neg(a)
    right = lambda x: (x > 0).astype(jnp.float32)  # 1 on real, 0 on fake
    swapped = lambda x: (x < 0).astype(jnp.float32)  # 0 on real, 1 on fake
    total, terms = losses.cmft_discriminator_loss(right, right, a, b, fake_a, fake_b)
    assert float(total) == 0.0 and float(terms["d_a"]) == 0.0 and float(terms["d_b"]) == 0.0
    total, terms = losses.cmft_discriminator_loss(swapped, swapped, a, b, fake_a, fake_b)
    assert float(terms["d_a"]) == 2.0 and float(terms["d_b"]) == 2.0  # (0 - 1)^2 + 1^2 each
    assert float(total) == 4.0
    # the generators' target is 1: D(fake) = 1 gives no adversarial loss, D(fake) = 0 gives 1 per discriminator
    _, terms, _ = losses.cmft_generator_loss(neg, neg, swapped, swapped, a, b, lambda_cycle=10.0)
    assert float(terms["g_adv"]) == 0.0
    _, terms, _ = losses.cmft_generator_loss(neg, neg, right, right, a, b, lambda_cycle=10.0)
    assert float(terms["g_adv"]) == 2.0
    assert float(losses.lsgan_generator_loss(jnp.ones(3))) == 0.0
    assert float(losses.lsgan_discriminator_loss(jnp.ones(3), jnp.zeros(3))) == 0.0


def test_each_discriminator_judges_its_own_modality():
    a, b = jnp.array([1.0]), jnp.array([10.0])  # fake_b = G_AB(a) = 2, fake_a = G_BA(b) = 6
    log_a, log_b = [], []
    d_a = _recorder(log_a, lambda x: x)
    d_b = _recorder(log_b, lambda x: 2.0 * x)
    _, terms, (fake_a, fake_b) = losses.cmft_generator_loss(G_AB, G_BA, d_a, d_b, a, b, lambda_cycle=0.0)
    assert log_b == [[2.0]] and log_a == [[6.0]]
    assert float(terms["g_adv"]) == pytest.approx((2 * 2 - 1) ** 2 + (6 - 1) ** 2)  # 9 + 25
    log_a.clear(), log_b.clear()
    total, terms = losses.cmft_discriminator_loss(d_a, d_b, a, b, fake_a, fake_b)
    assert log_b == [[10.0], [2.0]]  # D_B: real B, then fake B (Eq. 2)
    assert log_a == [[1.0], [6.0]]  # D_A: real A, then fake A (Eq. 3)
    assert float(terms["d_b"]) == pytest.approx((20 - 1) ** 2 + 4**2)  # 361 + 16
    assert float(terms["d_a"]) == pytest.approx((1 - 1) ** 2 + 6**2)  # 0 + 36
    assert float(total) == pytest.approx(377 + 36)


def test_discriminator_loss_stops_gradient_into_generator():
    a, b = jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0])

    def d_loss(w):
        g_ab = lambda x: w * x
        return losses.cmft_discriminator_loss(IDENT, IDENT, a, b, IDENT(b), g_ab(a))[0]

    assert float(jax.grad(d_loss)(3.0)) == 0.0
    # without the stop-gradient the same term would have gradient d/dw mean((w a)^2) = mean(2 w a^2) = 15
    assert float(jax.grad(lambda w: losses.lsgan_discriminator_loss(b, w * a))(3.0)) == pytest.approx(15.0)


def test_generator_loss_gradient_by_hand():
    # G_AB(x) = w x, G_BA = identity, D = identity, w = 3, lambda = 2, a = [1, 2], b = [2, 4]:
    #   fake_b = w a, fake_a = b, rec_a = w a, rec_b = w b
    #   loss = mean((w a - 1)^2) + mean((b - 1)^2) + lambda (mean|w a - a| + mean|w b - b|)
    #   d/dw = mean(2 (w a - 1) a) + lambda (mean|a| + mean|b|)   (w > 1)
    #        = mean(2*2*1, 2*5*2) + 2 * (1.5 + 3) = 12 + 9 = 21
    a, b = jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0])

    def g_loss(w):
        return losses.cmft_generator_loss(lambda x: w * x, IDENT, IDENT, IDENT, a, b, lambda_cycle=2.0)[0]

    value, grad = jax.value_and_grad(g_loss)(3.0)
    # value: mean(4, 25) + mean(1, 9) + 2 * (mean(2, 4) + mean(4, 8)) = 14.5 + 5 + 18
    assert float(value) == pytest.approx(37.5)
    assert float(grad) == pytest.approx(21.0)


def test_identity_term_weighted_and_absent_when_zero():
    # identity = mean|G_AB(b) - b| + mean|G_BA(a) - a| = mean(0, 4) + mean(0.5, 0) = 2.25
    lam = 10.0
    total, terms, _ = losses.cmft_generator_loss(G_AB, G_BA, IDENT, IDENT, A, B, lam, identity_weight=0.5)
    assert list(terms) == ["g_adv", "cycle", "identity", "g_total"]
    assert float(terms["identity"]) == pytest.approx(2.25)
    assert float(total) == pytest.approx(ADV + lam * CYC + 0.5 * 2.25)
    assert float(terms["g_total"]) == float(total)
    total, terms, _ = losses.cmft_generator_loss(G_AB, G_BA, IDENT, IDENT, A, B, lam, identity_weight=0.0)
    assert "identity" not in terms
    assert float(total) == pytest.approx(ADV + lam * CYC)


def test_self_reconstruction_generator_loss_by_hand():
    # G_AA(x) = 2x, G_BB(x) = x/2 + 1, D_A = identity, D_B(x) = 2x, a = [1, 2], b = [0, 4]:
    #   fake_a = [2, 4], fake_b = [1, 3]
    #   recon = mean(|2-1|, |4-2|) + mean(|1-0|, |3-4|) = 1.5 + 1 = 2.5
    #   adv = mean((2*1-1)^2, (2*3-1)^2) + mean((2-1)^2, (4-1)^2) = 13 + 5 = 18   (D_B on fake_b, D_A on fake_a)
    log_a, log_b = [], []
    d_a = _recorder(log_a, lambda x: x)
    d_b = _recorder(log_b, lambda x: 2.0 * x)
    total, terms, (fake_a, fake_b) = losses.self_reconstruction_generator_loss(G_AB, G_BA, d_a, d_b, A, B, 10.0)
    assert log_a == [[2.0, 4.0]] and log_b == [[1.0, 3.0]]
    np.testing.assert_allclose(fake_a, [2.0, 4.0])
    np.testing.assert_allclose(fake_b, [1.0, 3.0])
    assert list(terms) == ["g_adv", "recon", "g_total"]
    assert float(terms["recon"]) == pytest.approx(2.5)
    assert float(terms["g_adv"]) == pytest.approx(18.0)
    assert float(total) == pytest.approx(18.0 + 10.0 * 2.5)
    assert float(terms["g_total"]) == float(total)


def test_cmff_segmentation_loss_by_hand():
    # 2 voxels, 2 classes: voxel 0 is class 1, voxel 1 is class 0
    target = np.zeros((1, 2, 1, 1, 2), np.float32)
    target[0, 0, 0, 0, 1] = 1
    target[0, 1, 0, 0, 0] = 1
    # branch a: softmax([0, log 3]) = (0.25, 0.75), softmax([0, 0]) = (0.5, 0.5)
    # branch b: softmax([log 4, 0]) = (0.8, 0.2),  softmax([0, 0]) = (0.5, 0.5)
    logits_a = np.array([[0.0, np.log(3.0)], [0.0, 0.0]], np.float32).reshape(1, 2, 1, 1, 2)
    logits_b = np.array([[np.log(4.0), 0.0], [0.0, 0.0]], np.float32).reshape(1, 2, 1, 1, 2)
    eps = 1e-5
    # Dice per class: (2 sum(P Y) + eps) / (sum P + sum Y + eps)
    dice_a = 1 - ((2 * 0.5 + eps) / (0.75 + 1 + eps) + (2 * 0.75 + eps) / (1.25 + 1 + eps)) / 2
    dice_b = 1 - ((2 * 0.5 + eps) / (1.3 + 1 + eps) + (2 * 0.2 + eps) / (0.7 + 1 + eps)) / 2
    ce_a = (-np.log(0.75) - np.log(0.5)) / 2
    ce_b = (-np.log(0.2) - np.log(0.5)) / 2
    outputs = {"logits_a": jnp.asarray(logits_a), "logits_b": jnp.asarray(logits_b), "logits_f": None}

    total, terms = losses.cmff_segmentation_loss(outputs, jnp.asarray(target))
    assert list(terms) == ["dice_loss_a", "dice_loss_b"]
    assert float(terms["dice_loss_a"]) == pytest.approx(dice_a, rel=1e-5)
    assert float(terms["dice_loss_b"]) == pytest.approx(dice_b, rel=1e-5)
    assert float(total) == pytest.approx(dice_a + dice_b, rel=1e-5)

    total, terms = losses.cmff_segmentation_loss(outputs, jnp.asarray(target), ce_weight=0.5)
    assert list(terms) == ["dice_loss_a", "ce_a", "dice_loss_b", "ce_b"]
    assert float(terms["ce_a"]) == pytest.approx(0.5 * ce_a, rel=1e-5)
    assert float(terms["ce_b"]) == pytest.approx(0.5 * ce_b, rel=1e-5)
    assert float(total) == pytest.approx(dice_a + 0.5 * ce_a + dice_b + 0.5 * ce_b, rel=1e-5)

    # all three branches: S_F adds its own term
    outputs["logits_f"] = jnp.asarray(logits_a)
    total, terms = losses.cmff_segmentation_loss(outputs, jnp.asarray(target))
    assert list(terms) == ["dice_loss_a", "dice_loss_b", "dice_loss_f"]
    assert float(total) == pytest.approx(2 * dice_a + dice_b, rel=1e-5)


def test_segmentation_loss_sums_branch_dice_and_optional_cross_entropy():
    rng = np.random.default_rng(0)
    target = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (1, 4, 4, 4))]
    la, lf = (rng.normal(size=(1, 4, 4, 4, 4)).astype(np.float32) for _ in range(2))
    outputs = {"logits_a": la, "logits_b": None, "logits_f": lf}
    total, terms = losses.cmff_segmentation_loss(outputs, target)
    assert set(terms) == {"dice_loss_a", "dice_loss_f"}
    want = float(losses.soft_dice_loss(jax.nn.softmax(la), target) + losses.soft_dice_loss(jax.nn.softmax(lf), target))
    assert float(total) == pytest.approx(want, rel=1e-6)
    total_ce, terms_ce = losses.cmff_segmentation_loss(outputs, target, ce_weight=0.5)
    ce_a = -np.mean(np.sum(target * np.asarray(jax.nn.log_softmax(la)), axis=-1))
    assert float(terms_ce["ce_a"]) == pytest.approx(0.5 * ce_a, rel=1e-5)
    assert float(total_ce) == pytest.approx(want + float(terms_ce["ce_a"] + terms_ce["ce_f"]), rel=1e-6)
    perfect = {"logits_a": 50.0 * (2 * target - 1), "logits_b": None, "logits_f": None}
    assert float(losses.cmff_segmentation_loss(perfect, target, ce_weight=1.0)[0]) < 1e-5
