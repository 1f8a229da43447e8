import numpy as np
import pytest
import keras

import keras_mmfusion as mmf
from keras_mmfusion.datasets import stratified_split
from keras_mmfusion.training import Settings, Splits, build_model, run_trial
from keras_mmfusion.layers import training_labels
from keras_mmfusion.models import build_classifier, build_reference_classifier, with_modality_heads


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


@pytest.mark.parametrize("builder", ["standard", "reference"])
def test_min_max_scaling_maps_the_training_range_to_0_1_and_survives_saving(builder, tmp_path):
    rng = np.random.default_rng(3)
    train = shifted_modalities(rng, 300)
    train[1][:, 2] = 1.5  # a feature constant in training
    if builder == "standard":
        model = build_classifier(keras.layers.Concatenate(), [6, 4], 2, standardize_with=train, scaling="min_max")
    else:
        model = mmf.models.build_reference_classifier([6, 4], 2, units=8, standardize_with=train, scaling="min_max")
    scaled = keras.Model(model.inputs, [model.get_layer(f"min_max_{i}").output for i in range(2)])
    for z, x in zip(scaled(train), train):
        z = np.asarray(z)
        expected = (x - x.min(0)) / np.where(np.ptp(x, 0) > 0, np.ptp(x, 0), 1.0)
        np.testing.assert_allclose(z, expected, atol=1e-5)
    # The constant feature is only shifted: another value stays finite in test data.
    probe = [t[:4].copy() for t in train]
    probe[1][:, 2] = 2.5
    np.testing.assert_allclose(np.asarray(scaled(probe)[1])[:, 2], 1.0, atol=1e-6)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(train, verbose=0), model.predict(train, verbose=0), atol=1e-6)


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match=r"scaling must be one of \('standardize', 'min_max'\), got 'robust'"):
        build_classifier(keras.layers.Concatenate(), [6, 4], 2, standardize_with=[np.zeros((3, 6)), np.zeros((3, 4))],
                         scaling="robust")


def test_make_fusion_names_the_fusion_and_the_arguments_it_cannot_take():
    with pytest.raises(ValueError, match=r"make_fusion\('concat'\) with \['activation'\]: .*multiple values"):
        mmf.models.make_fusion("concat", 8, activation="tanh")
    with pytest.raises(ValueError, match=r"Unrecognized keyword arguments passed to DEQFusion: \{'max_iters': 4\}"):
        mmf.models.make_fusion("deq", 8, max_iters=4)


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
    seen = {"fit": [], "refit": []}
    counters = {k: keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs, k=k: seen[k].append(epoch))
                for k in seen}
    model, history, metrics = run_trial(splits, "concat", 0, settings, callbacks=[counters["fit"]],
                                        refit_callbacks=[counters["refit"]])
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    assert metrics["best_epoch"] == best_epoch
    # Each fit calls its own callbacks.
    assert seen == {"fit": list(range(metrics["epochs_run"])), "refit": list(range(best_epoch)) if refit else []}
    assert "converged_last_10" not in metrics  # no equilibrium layer, no convergence figures
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


def test_the_reference_recipe_runs_through_the_protocol_with_its_training_details():
    from keras_mmfusion.training import REFERENCE_RECIPE

    rng = np.random.default_rng(4)
    # Three modalities, as the recipe's per-view loss weights expect.
    train, test = shifted_modalities(rng, 60) + [rng.normal(size=(60, 3))], shifted_modalities(rng, 20) + [
        rng.normal(size=(20, 3))]
    splits = Splits((train, np.arange(60) % 2), (test, np.arange(20) % 2), 2, "toy")
    # Without XLA, whose compile of the solver loops would take most of the test's time.
    settings = Settings(**{**vars(REFERENCE_RECIPE), "units": 8, "epochs": 4, "lr_decay_every": 2,
                           "jit_compile": False})
    model, history, metrics = run_trial(splits, "reference", 0, settings)
    assert metrics["epochs_run"] == 4  # patience 0: every epoch runs, the best is kept
    assert int(model.optimizer.iterations) == 4  # one full batch per epoch
    np.testing.assert_allclose(history["learning_rate"], [1e-4, 1e-4, 2e-5, 2e-5], rtol=1e-6)
    assert model.optimizer.global_clipnorm == pytest.approx(REFERENCE_RECIPE.clipnorm)
    assert model.optimizer.coupled_weight_decay == REFERENCE_RECIPE.weight_decay
    assert (model.optimizer.epsilon, model.optimizer.torch_epsilon) == (1e-8, True)
    keep, _ = stratified_split(splits.train[1], settings.validation_fraction, 0)
    np.testing.assert_allclose(np.asarray(model.get_layer("min_max_0").mean).ravel(), train[0][keep].min(0), rtol=1e-5)
    deq = model.get_layer("deq_fusion")
    assert (deq.num_groups, deq.stop_mode, deq.max_iter) == (4, "abs", 30)
    # The converged fraction of the training solves, over the last 10 (here all 4) epochs.
    converged = np.asarray(history["deq_converged"])
    assert metrics["converged_last_10"] == pytest.approx(converged.mean())
    assert metrics["converged_last_10_lowest"] == pytest.approx(converged.min())
    adjoint = np.asarray(history["deq_backward_converged"])
    assert metrics["backward_converged_last_10"] == pytest.approx(adjoint.mean())
    assert metrics["backward_converged_last_10_lowest"] == pytest.approx(adjoint.min())
    assert [model.get_layer(f"feature_gate_{i}").sparsity_weight for i in range(3)] == [2.25, 1.5, 1.0]
    assert [model.get_layer(f"confidence_{i}").loss_weight for i in range(3)] == [2.25, 1.5, 1.0]
    assert not any("injection" in v.path for v in model.trainable_variables)  # the plain sum


def test_per_modality_loss_weights_must_name_every_modality():
    with pytest.raises(ValueError, match="gate_weight has 2 entries, one per modality was expected: 3"):
        build_reference_classifier([4, 4, 4], 2, units=8, gate_weight=[1.0, 2.0])


def test_a_float64_reference_classifier_computes_its_losses_and_probabilities_in_float64():
    policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = build_reference_classifier([3, 3], 2, units=4, dropout=0.0, fusion_options={"num_groups": 2})
        x = [np.ones((4, 3)), np.zeros((4, 3))]
        with training_labels(np.array([0, 1, 0, 1])):
            probabilities = model(x, training=True)
        assert probabilities.dtype == "float64"
        assert {loss.dtype.name for loss in model.losses} == {"float64"}
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy(policy)
