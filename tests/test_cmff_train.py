"""Phase 2 (CMFF): generator grafting, init modes, every variant trains, exact resume, best/final."""

from __future__ import annotations

import itertools
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config, override
from cmfl_jax.errors import CMFLError
from cmfl_jax.jobs.cmff import train as train_cmff
from cmfl_jax.models import builder
from cmfl_jax.models.cmff import BRANCHES
from cmfl_jax.models.fusion import ATTENTIONS
from cmfl_jax.training.cmff_step import create_state, make_train_step
from cmfl_jax.training.cmft_init import initial_params
from cmfl_jax.training.cmft_step import create_states as create_cmft_states

from .conftest import write_tiny_dataset

PATCH = 16


def tiny_cmff_config(root, steps=3, **overrides):
    config = load_config("cmff:smoke")
    config.data.root = str(root)
    config.data.patch_size = (PATCH,) * 3
    config.model.base, config.model.depth, config.model.conv_impl = 2, 2, "native"
    config.train.steps = steps
    config.data.split.folds, config.val.every = 3, 3
    override(config, overrides)
    return config


def tiny_cmft_config(root, **overrides):
    config = load_config("cmft:smoke")
    config.data.root = str(root)
    config.model.base, config.model.depth, config.model.conv_impl = 2, 2, "native"
    override(config, overrides)
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmff_data")
    write_tiny_dataset(root, n=3)
    return root


def write_cmft_checkpoint(workdir, config, step=5):
    """A CMFT workdir as configs/cmft.py leaves it: four states per checkpoint and config.json."""
    states = create_cmft_states(jax.random.key(7), config)
    manager = checkpoints.make_manager(str(workdir))
    checkpoints.save(manager, step, states, {"step": step}, force=True)
    checkpoints.close(manager)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    return states


@pytest.fixture(scope="module")
def cmft_run(tmp_path_factory, data_root):
    workdir = tmp_path_factory.mktemp("cmft_run")
    return workdir, write_cmft_checkpoint(workdir, tiny_cmft_config(data_root))


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_grafted_branches_equal_generators_but_for_the_head(data_root, cmft_run):
    workdir, cmft_states = cmft_run
    config = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": str(workdir)})
    params = initial_params(jax.random.key(0), builder.cmff_net(config.model), config)
    for branch, generator in (("S_A", "g_ab"), ("S_B", "g_ba")):
        got, want = flat(params[branch]), flat(cmft_states[generator].params)
        body = [k for k in got if not k.startswith("head/")]
        assert len(body) == len(want) - 2  # every leaf but head's kernel and bias
        for key in body:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{branch}/{key}")
        assert got["head/kernel"].shape == (1, 1, 1, 2, 4) and want["head/kernel"].shape == (1, 1, 1, 2, 2)
    # S_F starts at random: it equals the random init with the same key.
    random_params = initial_params(jax.random.key(0), builder.cmff_net(config.model), tiny_cmff_config(
        data_root, **{"init.mode": "random"}))
    for key, value in flat(params["S_F"]).items():
        np.testing.assert_array_equal(value, flat(random_params["S_F"])[key])


def test_known_generator_values_arrive_in_the_branches_not_the_heads_and_not_with_random_init(tmp_path, data_root):
    """A CMFT checkpoint whose generators hold constants (G_AB: 0.25, G_BA: -0.5 in every array): "cmft" init puts
    them in every S_A / S_B array but the 1^3 head, nowhere in S_F; "random" init puts them nowhere."""
    cmft = tiny_cmft_config(data_root)
    states = create_cmft_states(jax.random.key(7), cmft)
    constants = {"g_ab": 0.25, "g_ba": -0.5}
    for name, value in constants.items():
        states[name] = states[name].replace(params=jax.tree.map(lambda x, v=value: np.full_like(x, v),
                                                                states[name].params))
    manager = checkpoints.make_manager(str(tmp_path))
    checkpoints.save(manager, 5, states, {"step": 5}, force=True)
    checkpoints.close(manager)

    def holds(array, value):
        return bool(np.all(np.asarray(array) == value))

    config = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": str(tmp_path)})
    params = {b: flat(p) for b, p in initial_params(jax.random.key(0), builder.cmff_net(config.model),
                                                      config).items()}
    for branch, value in (("S_A", constants["g_ab"]), ("S_B", constants["g_ba"])):
        body = {k: v for k, v in params[branch].items() if not k.startswith("head/")}
        assert len(body) == len(flat(states["g_ab"].params)) - 2  # all but the head's kernel and bias
        assert all(holds(v, value) for v in body.values()), branch
        assert not any(holds(params[branch][k], value) for k in ("head/kernel", "head/bias"))
    assert not any(holds(v, c) for v in params["S_F"].values() for c in constants.values())
    random = tiny_cmff_config(data_root, **{"init.mode": "random"})
    params = initial_params(jax.random.key(0), builder.cmff_net(random.model), random)
    assert not any(holds(v, c) for branch in ("S_A", "S_B") for v in flat(params[branch]).values()
                   for c in constants.values())


def test_self_init_takes_the_self_reconstruction_generators(tmp_path, data_root):
    cmft = tiny_cmft_config(data_root, **{"cmft.objective": "self"})
    states = write_cmft_checkpoint(tmp_path, cmft)
    config = tiny_cmff_config(data_root, **{"init.mode": "self", "init.cmft_workdir": str(tmp_path)})
    params = initial_params(jax.random.key(0), builder.cmff_net(config.model), config)
    np.testing.assert_array_equal(flat(params["S_B"])["enc_0/conv_0/kernel"],
                                  flat(states["g_bb"].params)["enc_0/conv_0/kernel"])
    wrong = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": str(tmp_path)})
    with pytest.raises(CMFLError, match=r"has no generator g_ab.*init.mode=self"):
        initial_params(jax.random.key(0), builder.cmff_net(wrong.model), wrong)


@pytest.mark.parametrize("change, message", [
    ({"model.depth": 3}, r"checkpoint has no parameter dec_2/conv_0/bias \(18 missing; .*another depth"),
    ({"model.base": 4}, r"bottleneck/conv_0/bias has shape \(8,\) in the checkpoint but \(16,\)"),
])
def test_mismatched_cmft_checkpoint_gives_a_clear_error(tmp_path, data_root, change, message):
    cmft = tiny_cmft_config(data_root)
    write_cmft_checkpoint(tmp_path, cmft)
    os.remove(tmp_path / "config.json")  # without it the grafting itself must catch the mismatch
    config = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": str(tmp_path)}, **change)
    with pytest.raises(CMFLError, match=message) as err:
        initial_params(jax.random.key(0), builder.cmff_net(config.model), config)
    assert str(tmp_path) in str(err.value)


def test_cmft_config_mismatch_names_the_setting(tmp_path, data_root):
    write_cmft_checkpoint(tmp_path, tiny_cmft_config(data_root, **{"data.pairing": "t1-flair/t2-t1ce"}))
    config = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": str(tmp_path)})
    with pytest.raises(CMFLError, match=r"config.json: the CMFT run has data.pairing='t1-flair/t2-t1ce'"):
        initial_params(jax.random.key(0), builder.cmff_net(config.model), config)


@pytest.mark.parametrize("workdir, message", [
    ("", r"config.init.cmft_workdir: is empty"),
    ("missing", r"does not exist"),
    ("empty", r"no CMFT checkpoint here"),
])
def test_missing_cmft_run_gives_a_clear_error(tmp_path, data_root, workdir, message):
    if workdir:
        (tmp_path / "empty").mkdir()
        workdir = str(tmp_path / workdir)
    config = tiny_cmff_config(data_root, **{"init.mode": "cmft", "init.cmft_workdir": workdir})
    with pytest.raises(CMFLError, match=message):
        initial_params(jax.random.key(0), builder.cmff_net(config.model), config)


@pytest.mark.parametrize("branches, attention", list(itertools.product(BRANCHES, ATTENTIONS)))
def test_every_variant_trains_a_step(data_root, branches, attention):
    config = tiny_cmff_config(data_root, **{"model.branches": branches, "model.attention": attention,
                                            "init.mode": "random"})
    state = create_state(jax.random.key(0), config)
    before = flat(state.params)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(1, PATCH, PATCH, PATCH, 4)).astype(np.float32),
             "label": rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(1, PATCH, PATCH, PATCH))}
    states, metrics = make_train_step(config)({"seg": state}, batch)
    after = flat(states["seg"].params)
    active = {"fusion": "abf", "A": "a", "B": "b", "A+B": "ab"}[branches]
    assert {k for k in metrics if k.startswith("dice_loss_")} == {f"dice_loss_{c}" for c in active}
    np.testing.assert_allclose(float(metrics["loss"]), sum(float(metrics[f"dice_loss_{c}"]) for c in active),
                               rtol=1e-6)
    assert 0.0 < float(metrics["loss"]) <= len(active)
    for prefix in {"a": "S_A/", "b": "S_B/", "f": "S_F/"}.values():
        changed = [k for k in after if k.startswith(prefix) and not np.array_equal(before[k], after[k])]
        assert bool(changed) == any(prefix == {"a": "S_A/", "b": "S_B/", "f": "S_F/"}[c] for c in active), prefix


def run_to(config, workdir):
    states = train_cmff(config, str(workdir))
    return flat(states["seg"].params)


def test_three_steps_resume_three_steps_equals_six(tmp_path, data_root, cmft_run):
    cmft_workdir, _ = cmft_run
    common = {"init.mode": "cmft", "init.cmft_workdir": str(cmft_workdir), "train.save_every": 3}
    straight = run_to(tiny_cmff_config(data_root, steps=6, **common), tmp_path / "straight")
    run_to(tiny_cmff_config(data_root, steps=3, **common), tmp_path / "resumed")
    resumed = run_to(tiny_cmff_config(data_root, steps=6, **common), tmp_path / "resumed")
    for key in straight:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=0, atol=1e-6, err_msg=key)
    lines = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    train_steps = [x["step"] for x in lines if "train/loss" in x]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    val_steps = [x["step"] for x in lines if "val/dice_WT" in x]
    assert val_steps == [3, 6]
    # best, latest and final checkpoints; best holds the validation metrics it was chosen by
    meta = checkpoints.latest_meta(str(tmp_path / "resumed"), "best")
    scores = {x["step"]: x["val/dice_mean"] for x in lines if "val/dice_mean" in x}
    assert meta["step"] == max(scores, key=scores.get) and meta["val"]["dice_mean"] == pytest.approx(
        max(scores.values()))
    assert checkpoints.latest_step(str(tmp_path / "resumed"), "final") == 6
    assert sorted(os.listdir(tmp_path / "resumed" / "previews")) == ["cmff_val_0000003.png", "cmff_val_0000006.png"]
