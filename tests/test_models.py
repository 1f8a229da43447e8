import numpy as np
import pytest
import keras

import keras_mmfusion as mmf
from keras_mmfusion.datasets import stratified_split
from keras_mmfusion.training import Settings, Splits, build_model, run_trial
from keras_mmfusion.models import build_classifier, with_modality_heads


def shifted_modalities(rng, n):
    """Two modalities with offsets and scales far from zero mean and unit variance."""
    return [0.4 + 0.03 * rng.normal(size=(n, 6)), -5.0 + 7.0 * rng.normal(size=(n, 4))]


def standardized_outputs(model, inputs):
    outputs = [model.get_layer(f"standardize_{i}").output for i in range(len(inputs))]
    return keras.Model(model.inputs, outputs)(inputs)


def test_standardization_uses_the_given_training_statistics():
    rng = np.random.default_rng(0)
    train = shifted_modalities(rng, 500)
    model = build_classifier(keras.layers.Concatenate(), [6, 4], 2, standardize_with=train)
    for z in standardized_outputs(model, train):
        z = np.asarray(z)
        np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)


def test_standardization_needs_one_array_per_modality():
    with pytest.raises(ValueError, match="one per modality"):
        build_classifier(keras.layers.Concatenate(), [6, 4], 2, standardize_with=[np.zeros((3, 6))])


def test_experiment_models_standardize_with_the_training_part_only():
    rng = np.random.default_rng(1)
    train, test = shifted_modalities(rng, 200), [m + 100.0 for m in shifted_modalities(rng, 50)]
    splits = Splits((train, np.arange(200) % 2), (test, np.arange(50) % 2), 2, "toy")
    part = [m[:150] for m in train]
    model = build_model("concat", splits, Settings(units=8), train_inputs=part)
    for i, m in enumerate(part):
        np.testing.assert_allclose(np.asarray(model.get_layer(f"standardize_{i}").mean).ravel(), m.mean(0), rtol=1e-5)
    raw = build_model("concat", splits, Settings(units=8, standardize=False))
    assert not [l for l in raw.layers if isinstance(l, keras.layers.Normalization)]


@pytest.mark.parametrize("refit", [False, True])
def test_refit_retrains_on_the_whole_training_split_for_the_chosen_epochs(refit):
    rng = np.random.default_rng(2)
    train, test = shifted_modalities(rng, 100), shifted_modalities(rng, 20)
    splits = Splits((train, np.arange(100) % 2), (test, np.arange(20) % 2), 2, "toy")
    settings = Settings(units=8, epochs=6, patience=2, batch_size=16, refit=refit)
    model, history, metrics = run_trial(splits, "concat", 0, settings)
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    assert metrics["best_epoch"] == best_epoch
    mean = np.asarray(model.get_layer("standardize_0").mean).ravel()
    if refit:
        # Standardised with, and trained on, all 100 training samples for best_epoch epochs.
        np.testing.assert_allclose(mean, train[0].mean(0), rtol=1e-5)
        assert int(model.optimizer.iterations) == best_epoch * int(np.ceil(100 / 16))
    else:
        # The validation run's model: 80 training samples, stopped after epochs_run epochs.
        assert not np.allclose(mean, train[0].mean(0), rtol=1e-5)
        assert int(model.optimizer.iterations) == metrics["epochs_run"] * int(np.ceil(80 / 16))


def test_modality_heads_share_the_classifier_layers_and_add_one_head_per_modality():
    classifier = build_classifier(keras.layers.Concatenate(), [6, 4, 5], 3, encoder_units=8, dropout=0.5)
    trainer = with_modality_heads(classifier)
    assert sorted(trainer.output) == ["modality_0", "modality_1", "modality_2", "probabilities"]
    shared = {id(v) for v in classifier.trainable_weights}
    assert shared <= {id(v) for v in trainer.trainable_weights}
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(7, w)).astype("float32") for w in (6, 4, 5)]
    out = trainer(x, training=False)
    np.testing.assert_allclose(out["probabilities"], classifier(x, training=False), rtol=1e-6)
    for i in range(3):
        # Each head reads its own modality only: changing another modality leaves it unchanged.
        other = [m if j == i else m + 1.0 for j, m in enumerate(x)]
        np.testing.assert_allclose(trainer(other, training=False)[f"modality_{i}"], out[f"modality_{i}"], rtol=1e-6)
        assert out[f"modality_{i}"].shape == (7, 3)


def plain_two_input_model():
    inputs = [keras.Input((3,)), keras.Input((2,))]
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Concatenate()(inputs)))


@pytest.mark.parametrize(
    "model, message",
    [(lambda: build_classifier(None, [6], 2), "two or more modalities"),
     (plain_two_input_model, "no layer 'encoder_0'")],
)
def test_modality_heads_reject_models_they_cannot_supervise(model, message):
    with pytest.raises(ValueError, match=message):
        with_modality_heads(model())


def test_the_reference_classifier_runs_the_same_protocol():
    rng = np.random.default_rng(3)
    train, test = shifted_modalities(rng, 100), shifted_modalities(rng, 20)
    splits = Splits((train, np.arange(100) % 2), (test, np.arange(20) % 2), 2, "toy")
    settings = Settings(units=8, epochs=3, patience=2, batch_size=16, modality_weight=1.0)
    model, history, metrics = run_trial(splits, "reference", 0, settings)
    assert isinstance(model, mmf.models.ReferenceClassifier)
    # Its own confidence heads trained (no extra modality heads), on the 80-sample part.
    assert "confidence_0_loss" in history and "modality_0_loss" not in history
    keep, _ = stratified_split(splits.train[1], settings.validation_fraction, 0)
    np.testing.assert_allclose(np.asarray(model.get_layer("standardize_1").mean).ravel(), train[1][keep].mean(0),
                               rtol=1e-5)
    assert int(model.optimizer.iterations) == metrics["epochs_run"] * int(np.ceil(80 / 16))
    assert 0 <= metrics["accuracy"] <= 1
