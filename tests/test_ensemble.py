"""Fold ensembles in ``predict``: the mean of the models' probabilities, labels from it once; mismatches are one
line; the threshold of an ensemble is its CV run's pooled one, else the default."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cmfl_jax.config_variants import load_config
from cmfl_jax.errors import CMFLError
from cmfl_jax.inference.ensemble import EnsemblePredictor, model_dirs, read_cv_summary
from cmfl_jax.inference.sliding_window import restrict_to_brain
from cmfl_jax.inference.stablehlo import BUNDLE_FILE, BUNDLE_FORMAT, VolumePredictor
from cmfl_jax.jobs import predict
from cmfl_jax.label_classes import classes_to_labels


class Fake(VolumePredictor):
    def __init__(self, channels: int, source: str, normalization: str = "zscore_brain", value: float = 0.25,
                 output: str = "classes"):
        self.channels, self.source, self.normalization, self.value = channels, source, normalization, value
        self.output = output

    def probabilities(self, image, overlap=0.5, batch_size=1, mirror=False, window=None):
        return np.full((*image.shape[:3], self.channels), self.value, np.float32)


def test_mismatched_models_are_one_line(tmp_path):
    image = np.ones((4, 5, 6, 4), np.float32)
    mean = EnsemblePredictor([Fake(4, "m1", value=0.2), Fake(4, "m2", value=0.4)]).probabilities(image)
    np.testing.assert_allclose(mean, 0.3)
    labels, _ = EnsemblePredictor([Fake(4, "m1"), Fake(4, "m2")]).labels(image)  # the one conversion, inherited
    np.testing.assert_array_equal(labels, restrict_to_brain(classes_to_labels(np.zeros((4, 5, 6), int)), image))
    with pytest.raises(CMFLError, match=r"^config\.model_dir: m2 outputs 3 channel\(s\).*must predict the same"):
        EnsemblePredictor([Fake(4, "m1"), Fake(3, "m2")]).probabilities(image)
    with pytest.raises(CMFLError, match=r"^config\.model_dir: the models disagree on normalization"):
        EnsemblePredictor([Fake(4, "m1"), Fake(4, "m2", normalization="none")])
    with pytest.raises(CMFLError, match=r"^config\.model_dir: the models disagree on output \(classes, regions\)"):
        EnsemblePredictor([Fake(4, "m1"), Fake(3, "m2", output="regions")])
    regions = EnsemblePredictor([Fake(3, "r1", value=0.4, output="regions"), Fake(3, "r2", value=0.8,
                                                                                 output="regions")])
    labels, probs = regions.labels(image)  # mean 0.6 > 0.5 in WT, TC and ET: the nested conversion gives ET
    assert regions.output == "regions" and np.allclose(probs, 0.6) and set(np.unique(labels)) <= {0, 4}

    with pytest.raises(CMFLError, match=r"^config\.model_dir: an ensemble needs at least 2 models"):
        EnsemblePredictor([Fake(4, "m1")])
    with pytest.raises(CMFLError, match=r"^config\.model_dir: names a model twice"):
        model_dirs(f"{tmp_path},{tmp_path}/")
    with pytest.raises(CMFLError, match=r"^config\.model_dir: is empty"):
        model_dirs(" , ")


def fake_bundle(folder, et_min_mm3: float) -> str:
    """A folder that reads as a bundle with a tuned threshold (only bundle.json: nothing here loads a model)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, BUNDLE_FILE), "w") as f:
        json.dump({"format": BUNDLE_FORMAT, "postprocess": {"et_min_mm3": et_min_mm3}}, f)
    return str(folder)


def test_an_ensembles_threshold_is_its_cv_runs_pooled_one_else_the_default(tmp_path):
    cv = tmp_path / "cv"
    dirs = [fake_bundle(cv / f"fold{k}" / "cmff", 100.0 * (k + 1)) for k in range(2)]
    (cv / "config.json").write_text(json.dumps({"job": "cv"}))
    config = load_config("predict")
    with pytest.raises(CMFLError, match=r"cv_summary\.json: cannot read the cross-validation summary"):
        model_dirs(str(cv))  # a CV run that has not finished
    (cv / "cv_summary.json").write_text(json.dumps({"models": ["fold0/cmff", "fold1/cmff"],
                                                    "postprocess": {"et_min_mm3": 30.0}}))
    assert model_dirs(str(cv)) == (dirs, read_cv_summary(str(cv)))
    assert predict._tuned_et_threshold(config, *model_dirs(str(cv))) == 30.0  # the pooled one
    assert predict._tuned_et_threshold(config, *model_dirs(",".join(dirs))) == 30.0  # its folds one by one
    others = [fake_bundle(tmp_path / name, 50.0) for name in ("a", "b")]
    assert predict._tuned_et_threshold(config, *model_dirs(",".join(others))) is None  # -> the default 500
    assert predict._tuned_et_threshold(config, *model_dirs(f"{dirs[0]},{others[0]}")) is None  # two sources
    assert model_dirs(dirs[1]) == ([dirs[1]], None)  # one model alone: as before, its own tuned threshold
    assert predict._tuned_et_threshold(config, *model_dirs(dirs[1])) == 200.0
