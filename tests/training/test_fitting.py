import numpy as np
import pytest
import keras

from keras_mmfusion.training import compile_classifier, fit_classifier
from keras_mmfusion.models import build_classifier


def two_informative_modalities(rng, n):
    """The label shifts the mean of both modalities, so each can learn it alone."""
    y = np.arange(n) % 2
    x = [rng.normal(size=(n, w)).astype("float32") + 0.8 * y[:, None] for w in (5, 3)]
    return x, y


def classifier():
    return build_classifier(keras.layers.Concatenate(), [5, 3], 2, encoder_units=8, head_units=8)


def test_modality_heads_log_the_classifier_loss_under_its_own_names():
    rng = np.random.default_rng(0)
    # Whole batches only: Keras averages the total over batches but the per-output
    # losses over samples, so a smaller last batch would break the sum checked below.
    train, val = two_informative_modalities(rng, 96), two_informative_modalities(rng, 48)
    keras.utils.set_random_seed(0)
    model = classifier()
    weight = 0.5
    history, timer = fit_classifier(model, train, 8, val, batch_size=16, patience=3, modality_weight=weight)
    assert len(timer.times) == len(history["loss"])
    for prefix in ("", "val_"):
        assert f"{prefix}probabilities_loss" not in history
        heads = sum(np.asarray(history[f"{prefix}modality_{i}_loss"]) for i in range(2))
        # Keras's total is the classifier's loss plus the weighted head losses.
        np.testing.assert_allclose(history[f"{prefix}total_loss"],
                                   np.asarray(history[f"{prefix}loss"]) + weight * heads, rtol=1e-4)
    # The best epoch's weights are restored into the classifier, and "val_loss" is its
    # validation loss: evaluating the classifier alone gives the same number.
    compile_classifier(model)
    evaluated = model.evaluate(*val, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["loss"], min(history["val_loss"]), rtol=1e-4)
    assert model.predict(val[0], verbose=0).shape == (48, 2)


def test_negative_modality_weight_is_refused():
    with pytest.raises(ValueError, match="modality_weight must be >= 0"):
        compile_classifier(classifier(), modality_weight=-1.0)
