"""Mixed precision: with ``config.model.dtype="bfloat16"`` the CMFF step computes in bfloat16, keeps float32
params and optimizer state, and still trains (the loss on a fixed phantom patch falls). With ``"float16"`` both
steps lower for cuda with float16 convolutions, train with a dynamic loss scale that grows after finite steps
and halves after an overflow (whose update is skipped), and save the scale with the states."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.data.pipeline import crop_centered
from cmfl_jax.data.preprocess import preprocess_images
from cmfl_jax.jobs import cmff as cmff_job
from cmfl_jax.synthetic import make_subject
from cmfl_jax.training import cmff_step, cmft_step
from cmfl_jax.training.cmff_step import create_state, make_train_step

from .test_cmff_train import data_root, tiny_cmff_config  # noqa: F401 (fixture)
from .test_lowering import abstract, conv_ranks

pytestmark = pytest.mark.device_check  # run by python -m experiments.device_check on the device it checks

STEPS = 30
PATCH = (32, 32, 32)
OVERFIT_PATCH = (16, 16, 16)  # the training tests: CPU bfloat16/float16 convolutions are slow, 1/8 of 32^3 each step


def phantom_batch(patch: tuple[int, int, int] = PATCH) -> dict:
    """One tumour-centred patch of a synthetic HGG subject (all four classes present, 32^3 and 16^3 alike)."""
    subject = make_subject(1, (48, 48, 48), lgg=False)
    image = np.moveaxis(preprocess_images(subject.images), 0, -1)
    return {"image": crop_centered(image, subject.centre, patch)[None],
            "label": crop_centered(subject.label, subject.centre, patch)[None]}


@pytest.mark.slow
def test_bfloat16_cmff_overfits_a_patch_with_float32_params():
    config = load_config("cmff:smoke")  # U-Net base 4, depth 2, random init
    config.model.dtype, config.model.conv_impl = "bfloat16", "native"
    config.cmff.lr, config.cmff.ce_weight = 1e-2, 1.0  # a fast fall in 30 steps (bf16 and f32 alike)
    batch = phantom_batch(OVERFIT_PATCH)
    assert set(np.unique(batch["label"])) == {0, 1, 2, 4}
    states = {"seg": create_state(jax.random.key(0), config)}
    lowered = make_train_step(config).lower(states, batch)
    hlo = lowered.as_text()
    assert "bf16" in hlo and "convolution" in hlo  # the convolutions run in bfloat16
    step = lowered.compile()  # the program checked above is the one trained (compiled once)
    losses = []
    for _ in range(STEPS):
        states, metrics = step(states, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses  # measured: 6.80 -> 3.27 at step 30
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 0.8 * (STEPS - 1), losses
    leaves = jax.tree.leaves((states["seg"].params, states["seg"].opt_state))
    assert leaves and all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(states["seg"].params))


def float16_config(**train):
    config = load_config("cmff:smoke")
    config.model.dtype, config.model.conv_impl = "float16", "native"
    config.cmff.lr, config.cmff.ce_weight = 1e-2, 1.0
    config.update_from_flattened_dict({f"train.{k}": v for k, v in train.items()})
    return config


@pytest.mark.slow
def test_float16_steps_lower_for_cuda_with_float16_convolutions():
    for config, module in ((load_config("cmft:smoke"), cmft_step), (float16_config(), cmff_step)):
        config.model.dtype = "float16"
        image = jax.ShapeDtypeStruct((1, *config.data.patch_size, 4), jnp.float32)
        batch = {"image": image, "label": jax.ShapeDtypeStruct(image.shape[:-1], jnp.uint8)}
        states = abstract(module.create_states(jax.random.key(0), config, **({"resuming": True}
                                                                              if module is cmff_step else {})))
        assert set(states["loss_scale"]) == ({"generators", "discriminators"} if module is cmft_step else {"seg"})
        text = module.make_train_step(config).trace(states, batch).lower(lowering_platforms=("cuda",)).as_text()
        ranks = conv_ranks(text)
        assert ranks[3] > 0 and set(ranks) == {3}, ranks
        assert re.search(r"stablehlo\.convolution.*tensor<[0-9x]*xf16>", text)  # the convolutions run in float16


@pytest.mark.slow
def test_float16_cmff_overfits_a_patch_with_a_loss_scale():
    config = float16_config(**{"loss_scale.growth_interval": 5})
    batch = phantom_batch(OVERFIT_PATCH)
    assert set(np.unique(batch["label"])) == {0, 1, 2, 4}
    states = cmff_step.create_states(jax.random.key(0), config)
    step = cmff_step.make_train_step(config)
    losses, scales = [], []
    for _ in range(STEPS):
        states, metrics = step(states, batch)
        losses.append(float(metrics["loss"]))
        scales.append(float(metrics["seg_loss_scale"]))
    assert all(np.isfinite(losses)) and float(metrics["skipped"]) == 0.0
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    assert scales[0] == 32768.0 and max(scales) > 32768.0, scales  # 5 finite steps in a row double it
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(states["seg"].params))


@pytest.mark.slow
@pytest.mark.parametrize("module", [cmff_step, cmft_step])
def test_an_overflow_halves_the_scale_and_skips_the_update(module):
    """loss x 2^101 overflows float16: the update is skipped and the scale halves. The NaN guard does not count
    it, unless the scale is at its minimum (2^100 here) and cannot back off."""
    config = float16_config(**{"loss_scale.minimum": 2.0 ** 100})
    if module is cmft_step:
        config = load_config("cmft:smoke")
        config.model.dtype, config.model.conv_impl = "float16", "native"
        config.train.loss_scale.minimum = 2.0 ** 100
    config.model.base = 2  # CPU float16 convolutions are slow: the smallest networks
    cut = 32 if module is cmft_step else 16  # the discriminator takes no less than 32^3
    batch = {k: v[:, :cut, :cut, :cut] for k, v in phantom_batch().items() if module is cmff_step or k == "image"}
    step = module.make_train_step(config)
    for scale, counted in ((2.0 ** 101, 0.0), (2.0 ** 100, 1.0)):
        states = module.create_states(jax.random.key(0), config)
        states["loss_scale"] = {k: s.replace(scale=jnp.asarray(scale, jnp.float32))
                                for k, s in states["loss_scale"].items()}
        before = jax.tree.map(np.array, {k: v for k, v in states.items() if k != "loss_scale"})
        states, metrics = step(states, batch)
        assert float(metrics["skipped"]) == 1.0 and float(metrics["nonfinite"]) == counted
        assert np.isfinite(float(metrics["loss" if module is cmff_step else "cycle"]))
        after = jax.tree.map(np.array, {k: v for k, v in states.items() if k != "loss_scale"})
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
        assert {float(s.scale) for s in states["loss_scale"].values()} == {max(scale / 2, 2.0 ** 100)}


def test_the_loss_scale_is_saved_and_restored_with_the_states(tmp_path):
    config = float16_config()
    states = cmff_step.create_states(jax.random.key(0), config)
    states["loss_scale"]["seg"] = states["loss_scale"]["seg"].replace(scale=jnp.asarray(1024.0), fin_steps=
                                                                     jnp.asarray(7, jnp.int32))
    manager = checkpoints.make_manager(str(tmp_path), 1)
    checkpoints.save(manager, 1, states, {"step": 1}, force=True)
    checkpoints.close(manager)
    with checkpoints.read_only(str(tmp_path)) as manager:
        restored, _ = checkpoints.restore(manager, cmff_step.create_states(jax.random.key(1), config))
    scale = restored["loss_scale"]["seg"]
    assert float(scale.scale) == 1024.0 and int(scale.fin_steps) == 7 and scale.growth_interval == 2000


@pytest.mark.slow
def test_a_resumed_float16_run_continues_with_its_loss_scale(tmp_path, data_root):  # noqa: F811
    """2 steps, then 2 more from the checkpoint, equal 4 straight: params and the scale, which doubles after
    every finite step here (growth_interval 1), so a scale not saved would restart at 2^15 and differ."""
    def config(steps):
        c = tiny_cmff_config(data_root, steps=steps, **{"init.mode": "random", "model.dtype": "float16",
                                                        "train.save_every": 2, "val.every": 100})
        c.train.loss_scale.growth_interval = 1
        return c

    straight = cmff_job.train(config(4), str(tmp_path / "straight"))
    cmff_job.train(config(2), str(tmp_path / "resumed"))
    resumed = cmff_job.train(config(4), str(tmp_path / "resumed"))
    assert float(straight["loss_scale"]["seg"].scale) > 32768.0
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
