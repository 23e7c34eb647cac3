"""Region outputs (``config.model.output="regions"``): targets, the nested conversion back to labels, the region
Dice, the 3-channel heads of every variant, the WT-guided attention, training, CMFT init, and predict/export."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest

from cmfl_jax import losses
from cmfl_jax.config_variants import load_config
from cmfl_jax.data.io import load_subject
from cmfl_jax.data.layouts import discover
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.sliding_window import restrict_to_brain
from cmfl_jax.jobs.cmff import train as train_cmff
from cmfl_jax.label_classes import labels_to_regions, probs_to_labels, regions_to_labels
from cmfl_jax.models import CMFFNet, FusionBranch, builder
from cmfl_jax.models.cmff import BRANCHES
from cmfl_jax.models.fusion import ATTENTIONS
from cmfl_jax.training.cmff_step import create_state, make_train_step
from cmfl_jax.training.cmft_init import initial_params

from .conftest import write_tiny_dataset
from .test_cmff_train import PATCH, flat, tiny_cmff_config, tiny_cmft_config, write_cmft_checkpoint
from .test_models_fusion import fusion_inputs, inputs_of


def test_labels_to_region_targets_by_hand():
    label = np.array([[0, 1, 2], [4, 0, 2]], np.uint8)
    want = np.array([[[0, 0, 0], [1, 1, 0], [1, 0, 0]],  # WT, TC, ET of 0, 1, 2
                     [[1, 1, 1], [0, 0, 0], [1, 0, 0]]], np.float32)  # of 4, 0, 2
    np.testing.assert_array_equal(labels_to_regions(label), want)
    np.testing.assert_array_equal(np.asarray(labels_to_regions(jnp.asarray(label))), want)


def test_region_probabilities_to_labels_nested_overwrite():
    """2 where WT, then 1 where TC, then 4 where ET, each overwriting the previous (nnU-Net's BraTS rule)."""
    probs = np.array([
        [0.1, 0.1, 0.1],  # nothing -> 0
        [0.9, 0.2, 0.1],  # WT only -> oedema
        [0.9, 0.8, 0.3],  # WT and TC -> NCR/NET
        [0.9, 0.8, 0.7],  # all three -> ET
        [0.2, 0.1, 0.9],  # ET outside WT and TC: ET still wins
        [0.1, 0.9, 0.1],  # TC outside WT -> NCR/NET
        [0.5, 0.5, 0.5],  # exactly 0.5 is off
        [0.9, 0.1, 0.51],  # ET inside WT but outside TC -> ET
    ], np.float32)
    want = np.array([0, 2, 1, 4, 4, 1, 0, 4], np.uint8)
    got = regions_to_labels(probs)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(probs_to_labels(probs, "regions"), want)
    # a label map survives labels -> regions -> labels
    label = np.array([[0, 1, 2, 4], [4, 2, 1, 0]], np.uint8)
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(label)), label)


def test_classes_path_is_the_argmax_and_a_bad_kind_is_one_line():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]], np.float32)
    np.testing.assert_array_equal(probs_to_labels(probs, "classes"), [4, 0, 1])
    with pytest.raises(CMFLError, match=r"^config\.model\.output: unknown value 'region'; choose one of"):
        probs_to_labels(probs, "region")
    config = load_config("cmff:smoke")
    config.model.output = "masks"
    with pytest.raises(CMFLError, match=r"^config\.model\.output: unknown value 'masks'"):
        make_train_step(config)
    with pytest.raises(CMFLError, match=r"^config\.model\.output: unknown value 'masks'"):
        builder.random_params(builder.cmff_net(config.model), jax.random.key(0))


def test_region_dice_by_hand():
    probs = np.array([[[0.8, 0.6, 0.1], [0.5, 0.2, 0.3]]], np.float32)  # (N=1, 2 voxels, 3 regions)
    target = np.array([[[1, 1, 0], [1, 0, 0]]], np.float32)
    eps = 1e-5
    wt = (2 * (0.8 + 0.5) + eps) / (0.8 + 0.5 + 2 + eps)
    tc = (2 * 0.6 + eps) / (0.6 + 0.2 + 1 + eps)
    et = (0 + eps) / (0.1 + 0.3 + 0 + eps)
    want = 1 - (wt + tc + et) / 3
    np.testing.assert_allclose(float(losses.soft_dice_loss(jnp.asarray(probs), jnp.asarray(target))), want,
                               rtol=1e-6)
    # in the CMFF loss: the branch's sigmoid, plus ce_weight x the mean binary cross-entropy
    logits = np.log(probs / (1 - probs))
    total, terms = losses.cmff_segmentation_loss({"logits_a": jnp.asarray(logits), "logits_b": None,
                                                  "logits_f": None}, jnp.asarray(target), 0.5, "regions")
    bce = -np.mean(target * np.log(probs) + (1 - target) * np.log(1 - probs))
    np.testing.assert_allclose(float(terms["dice_loss_a"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(terms["ce_a"]), 0.5 * bce, rtol=1e-5)
    np.testing.assert_allclose(float(total), want + 0.5 * bce, rtol=1e-5)
    assert float(optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(target)).mean()) == \
        pytest.approx(bce, rel=1e-5)


@pytest.mark.parametrize("branches,attention", list(itertools.product(BRANCHES, ATTENTIONS)))
def test_every_variant_has_three_sigmoid_channels(branches, attention):
    net = CMFFNet(branches=branches, attention=attention, output="regions", base=4, depth=2, conv_impl="native")
    a, b = jnp.ones((1, 16, 16, 16, 2)), -jnp.ones((1, 16, 16, 16, 2))
    variables = jax.eval_shape(net.init, jax.random.key(0), a, b)
    out = jax.eval_shape(net.apply, variables, a, b)
    assert out["probs"].shape == (1, 16, 16, 16, 3)
    for branch in ("S_A", "S_B", "S_F"):
        if branch in variables["params"]:
            assert variables["params"][branch]["head"]["kernel"].shape[-1] == 3


@pytest.mark.slow
def test_a_plus_b_averages_the_sigmoids_and_fusion_is_s_f_sigmoid():
    a = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 2))
    b = jax.random.normal(jax.random.key(2), (1, 16, 16, 16, 2))
    for branches in ("A+B", "fusion"):
        net = CMFFNet(branches=branches, output="regions", base=4, depth=2, conv_impl="native")
        out = net.apply(net.init(jax.random.key(0), a, b), a, b)
        want = (0.5 * (jax.nn.sigmoid(out["logits_a"]) + jax.nn.sigmoid(out["logits_b"])) if branches == "A+B"
                else jax.nn.sigmoid(out["logits_f"]))
        np.testing.assert_allclose(out["probs"], want, rtol=1e-6)
        assert not np.allclose(np.asarray(out["probs"]).sum(-1), 1.0)  # independent sigmoids, not a softmax


@pytest.mark.slow
def test_mask_guided_attention_uses_the_predicted_wt():
    """F' = F + F * p_A[WT] + F * p_B[WT] for regions (channel 0 is WT), by hand."""
    fa, fb, _, _ = fusion_inputs(seed=3, shape=(1, 4, 4, 4))
    ks = jax.random.split(jax.random.key(5), 2)
    pa, pb = (jax.nn.sigmoid(3 * jax.random.normal(k, (1, 4, 4, 4, 3))) for k in ks)
    none = FusionBranch(features=4, attention="none", num_classes=3, conv_impl="native", output="regions")
    mask = none.clone(attention="mask")
    params = mask.init(jax.random.key(0), fa, fb, pa, pb)
    f = inputs_of("out_conv", none.apply, params, fa, fb, pa, pb).astype(np.float64)
    got = inputs_of("out_conv", mask.apply, params, fa, fb, pa, pb)
    m_a, m_b = np.asarray(pa, np.float64)[..., :1], np.asarray(pb, np.float64)[..., :1]
    np.testing.assert_allclose(got, f + f * m_a + f * m_b, rtol=1e-5, atol=1e-6)
    assert params["params"]["head"]["kernel"].shape == (1, 1, 1, 4, 3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions_data")
    write_tiny_dataset(root, n=3)
    return root


@pytest.mark.slow
def test_regions_training_lowers_the_loss(data_root):
    config = tiny_cmff_config(data_root, **{"model.output": "regions", "init.mode": "random", "cmff.lr": 1e-2,
                                            "cmff.ce_weight": 1.0})
    states = {"seg": create_state(jax.random.key(0), config)}
    rng = np.random.default_rng(0)
    label = np.zeros((1, PATCH, PATCH, PATCH), np.uint8)
    label[:, 4:12, 4:12, 4:12], label[:, 6:10, 6:10, 6:10], label[:, 7:9, 7:9, 7:9] = 2, 4, 1
    batch = {"image": rng.normal(size=(1, PATCH, PATCH, PATCH, 4)).astype(np.float32) + label[..., None],
             "label": label}
    step = make_train_step(config)
    seen = []
    for _ in range(4):
        states, metrics = step(states, batch)
        seen.append(float(metrics["loss"]))
    assert set(metrics) >= {"dice_loss_a", "dice_loss_b", "dice_loss_f", "ce_a", "ce_b", "ce_f"}
    assert seen[-1] < seen[0], seen


def test_cmft_init_grafts_all_but_the_three_channel_heads(tmp_path, data_root):
    cmft_workdir = tmp_path / "cmft"
    cmft_workdir.mkdir()
    cmft_states = write_cmft_checkpoint(cmft_workdir, tiny_cmft_config(data_root))
    config = tiny_cmff_config(data_root, **{"model.output": "regions", "init.mode": "cmft",
                                            "init.cmft_workdir": str(cmft_workdir)})
    params = flat(initial_params(jax.random.key(0), builder.cmff_net(config.model), config))
    for branch, name in (("S_A", "g_ab"), ("S_B", "g_ba")):
        generator = flat(cmft_states[name].params)
        for key, value in generator.items():
            if not key.startswith("head/"):
                np.testing.assert_array_equal(params[f"{branch}/{key}"], value)
        assert params[f"{branch}/head/kernel"].shape[-1] == 3 and generator["head/kernel"].shape[-1] == 2


@pytest.mark.slow
def test_train_validate_export_and_predict_both_paths_agree(tmp_path, data_root, monkeypatch):
    """A regions run validates, exports a bundle recording its output kind, and predict gives the same labels
    from its params and from its StableHLO, equal to the nested conversion of the probabilities."""
    from cmfl_jax.inference.bundle import export_bundle
    from cmfl_jax.inference.stablehlo import load_stablehlo_predictor
    from cmfl_jax.jobs.predict import run as run_predict

    workdir = tmp_path / "run"
    config = tiny_cmff_config(data_root, steps=2, **{"model.output": "regions", "init.mode": "random",
                                                     "val.every": 2})
    train_cmff(config, str(workdir))
    (workdir / "config.json").write_text(config.to_json_best_effort())
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    assert any("val/dice_WT" in x for x in lines)
    bundle = export_bundle(str(workdir), str(tmp_path / "bundle"), "final", platforms="cpu")
    info = json.load(open(os.path.join(bundle, "bundle.json")))
    assert info["output"] == "regions" and info["region_labels"] == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
    assert load_stablehlo_predictor(bundle).output == "regions"
    write_tiny_dataset(tmp_path / "data", n=1)
    outs = {}
    for use_stablehlo in (False, True):
        predict = load_config("predict")
        predict.model_dir, predict.data.root, predict.use_stablehlo = bundle, str(tmp_path / "data"), use_stablehlo
        predict.save_probabilities, predict.postprocess.et_min_mm3 = True, 0.0
        predict.out_dir = str(tmp_path / f"stablehlo_{use_stablehlo}")
        if use_stablehlo:
            monkeypatch.setattr(builder, "cmff_net", lambda *a: pytest.fail("the Flax model was built"))
        run_predict(predict, str(tmp_path / "work"))
        outs[use_stablehlo] = {f: np.asarray(nib.load(os.path.join(predict.out_dir, f)).dataobj)
                               for f in sorted(os.listdir(predict.out_dir))}
    labels, probs = (outs[True][f"Brats18_SYN_0000_1{s}.nii.gz"] for s in ("", "_probabilities"))
    assert probs.shape[-1] == 3
    np.testing.assert_allclose(probs, outs[False]["Brats18_SYN_0000_1_probabilities.nii.gz"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, outs[False]["Brats18_SYN_0000_1.nii.gz"])
    (subject,) = discover(str(tmp_path / "data"), require_labels=False)
    image = np.stack(load_subject(subject, with_label=False).images, axis=-1)
    np.testing.assert_array_equal(labels, restrict_to_brain(regions_to_labels(probs), image))
    assert len(np.unique(labels)) > 1  # not a constant map: the comparisons mean something
