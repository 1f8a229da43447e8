"""End to end on the real ROSMAP data: validation-selected training, then the test split."""

import os

import numpy as np
import pytest

from keras_mmfusion.datasets import stratified_split
from keras_mmfusion.training import Settings, load_splits, run_trial

ROSMAP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rosmap")


@pytest.mark.skipif(not os.path.isdir(ROSMAP), reason=f"ROSMAP data not found at {ROSMAP}")
def test_concat_classifier_learns_rosmap(monkeypatch):
    monkeypatch.setenv("MMFUSION_ROSMAP", ROSMAP)
    splits = load_splits("rosmap")
    settings = Settings(units=32, dropout=0.5, epochs=60, patience=15)
    model, history, metrics = run_trial(splits, "concat", 0, settings)
    # Standardised with the statistics of the 80% that trained, not of all training data.
    keep, _ = stratified_split(splits.train[1], settings.validation_fraction, 0)
    mean = np.asarray(model.get_layer("standardize_0").mean).ravel()
    np.testing.assert_allclose(mean, splits.train[0][0][keep].mean(0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(mean, splits.train[0][0].mean(0), rtol=1e-4, atol=1e-6)
    # Chance is 0.5 AUC; the 5-seed mean of this classifier is above 0.8.
    assert metrics["auc"] > 0.75 and metrics["accuracy"] > 0.65
    assert metrics["epochs_run"] <= 60 and len(history["val_loss"]) == metrics["epochs_run"]
