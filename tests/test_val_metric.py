"""config.val.metric: the family that picks CMFF's best/ checkpoint (and tunes the ET threshold).

The Validator runs as in training, but its sliding-window prediction is replaced by hand-made predictions per
step: step 3 finds the tumour exactly and adds one tiny false lesion (legacy Dice 0.99, lesion-wise Dice 0.5:
the false lesion counts as much as the tumour); step 6 finds only the tumour's eroded core (legacy and
lesion-wise Dice 2 * 216 / (512 + 216) = 0.59). The legacy family keeps step 3, the lesion-wise one step 6.
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from cmfl_jax import checkpoints
from cmfl_jax.config_variants import load_config
from cmfl_jax.training import validation

LABEL = np.zeros((24, 24, 24), np.uint8)
LABEL[4:12, 4:12, 4:12] = 4  # 512 voxels of enhancing tumour: ET = TC = WT
EXACT_PLUS_FALSE = LABEL.copy()
EXACT_PLUS_FALSE[20:22, 20:22, 20:22] = 4  # 8 voxels, far from the tumour
ERODED = np.zeros_like(LABEL)
ERODED[5:11, 5:11, 5:11] = 4  # 216 voxels
PREDICTIONS = {3: EXACT_PLUS_FALSE, 6: ERODED}
CORE_DICE = 2 * 216 / (512 + 216)


def best_after_training(tmp_path, monkeypatch, metric: str) -> dict:
    config = load_config("cmff:smoke")
    config.train.steps, config.val.metric = 6, metric
    validator = validation.Validator(config, [types.SimpleNamespace(subject_id="s0")], str(tmp_path))

    def evaluate(params, entries, step=None):  # the metrics of this step's prediction, as Validator.evaluate
        pred = PREDICTIONS[step]
        scores = validation.score_subject(pred, LABEL, (1.0, 1.0, 1.0), validator.metric)
        return [scores] * len(entries), ("s0", None, LABEL, pred, scores["WT"]["dice"])

    monkeypatch.setattr(validator, "evaluate", evaluate)
    monkeypatch.setattr(validation, "save_segmentation_png", lambda *args, **kwargs: None)
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=optax.sgd(0.1))
    records = [validator(step, {"seg": state}) for step in (3, 6)]
    validator.close()
    return {"meta": checkpoints.latest_meta(str(tmp_path), "best"), "records": records}


def test_the_default_legacy_family_keeps_the_step_with_the_best_mean_dice(tmp_path, monkeypatch):
    assert load_config("cmff").val.metric == "legacy"
    run = best_after_training(tmp_path, monkeypatch, "legacy")
    assert run["meta"]["step"] == 3
    assert run["meta"]["val"]["dice_mean"] == pytest.approx(2 * 512 / (512 + 520))
    assert "ranked_dice_mean" not in run["records"][0]
    assert run["meta"]["postprocess"]["dice_ET"] == pytest.approx(2 * 512 / (512 + 520))


def test_lesionwise_keeps_the_step_without_the_false_lesion(tmp_path, monkeypatch):
    run = best_after_training(tmp_path, monkeypatch, "lesionwise")
    assert [r["ranked_dice_mean"] for r in run["records"]] == pytest.approx([0.5, CORE_DICE])
    assert run["records"][0]["dice_mean"] > run["records"][1]["dice_mean"]  # legacy would keep step 3
    assert run["meta"]["step"] == 6 and run["meta"]["val"]["ranked_dice_ET"] == pytest.approx(CORE_DICE)
    # the ET threshold tuned on the lesion-wise ET Dice: keeping the 216 voxels (0.59) beats dropping them (0)
    assert run["meta"]["postprocess"]["dice_ET"] == pytest.approx(CORE_DICE)
    assert run["meta"]["postprocess"]["et_min_mm3"] <= 200.0


def test_an_unknown_family_is_refused(tmp_path):
    config = load_config("cmff:smoke")
    config.val.metric = "hd95"
    with pytest.raises(ValueError, match="legacy, lesionwise"):
        validation.Validator(config, [], str(tmp_path))
