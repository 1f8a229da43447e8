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


def test_weight_decay_is_coupled_and_reaches_every_trainable_variable():
    rng = np.random.default_rng(1)
    x, y = two_informative_modalities(rng, 32)
    keras.utils.set_random_seed(0)
    model = classifier()
    rate = 0.3
    compile_classifier(model, weight_decay=rate)
    # The decay lives in the optimizer (added to the clipped gradient, as PyTorch's
    # Adam(weight_decay=rate)), not in the loss: the loss has no penalty term.
    assert model.optimizer.coupled_weight_decay == rate
    assert not model.losses
    data_loss = float(keras.losses.sparse_categorical_crossentropy(y, model(x)).numpy().mean())
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=32, verbose=0)[0], data_loss, rtol=1e-4)
    # A zero gradient still moves every nonzero variable towards zero: the
    # step of Adam on rate * w alone.
    before = [v.numpy().copy() for v in model.trainable_weights]
    model.optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_weights])
    for b, v in zip(before, model.trainable_weights):
        moved = v.numpy() - b
        assert np.all(moved[b != 0] * b[b != 0] < 0), v.path
    # With modality heads, the heads' variables decay too: they are the trainer's.
    trainer = compile_classifier(classifier(), weight_decay=rate, modality_weight=1.0)
    assert len(trainer.trainable_weights) > len(model.trainable_weights)
    assert trainer.optimizer.coupled_weight_decay == rate


def test_step_decay_clipping_and_patience_zero_run_every_epoch():
    rng = np.random.default_rng(2)
    train, val = two_informative_modalities(rng, 32), two_informative_modalities(rng, 16)
    keras.utils.set_random_seed(0)
    model = classifier()
    history, timer = fit_classifier(model, train, 6, val, batch_size=32, patience=0, lr=0.01, clipnorm=0.5,
                                    lr_decay_every=2, lr_decay_factor=0.5)
    assert len(timer.times) == 6
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], rtol=1e-6)
    assert model.optimizer.global_clipnorm == 0.5
    # The best validation epoch's weights are restored even though no epoch stopped the run.
    compile_classifier(model)
    np.testing.assert_allclose(model.evaluate(*val, batch_size=16, verbose=0)[0], min(history["val_loss"]), rtol=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(clipnorm=-1.0), "clipnorm must be >= 0"),
])
def test_negative_training_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        compile_classifier(classifier(), **options)


def test_step_decay_needs_a_period_and_a_factor_in_0_1():
    from keras_mmfusion.training.fitting import step_decay
    with pytest.raises(ValueError, match="every >= 1 and 0 < factor <= 1"):
        step_decay(1e-3, 0, 0.5)
    with pytest.raises(ValueError, match="every >= 1 and 0 < factor <= 1"):
        step_decay(1e-3, 10, 1.5)


@pytest.mark.parametrize("modality_weight", [0.0, 0.5])
def test_the_training_step_is_traced_once(modality_weight, monkeypatch):
    """The optimizer's, metrics' and losses' variables exist before fit traces the step,
    so TensorFlow traces it once and not again to create them."""
    import keras_mmfusion.training.fitting as fitting
    from keras_mmfusion.models import make_fusion

    traces = []

    def compile_and_count(*args, **kwargs):
        trainer = compile_classifier(*args, **kwargs)
        step = trainer.train_step
        trainer.train_step = lambda data: traces.append(data) or step(data)  # runs once per trace
        return trainer

    monkeypatch.setattr(fitting, "compile_classifier", compile_and_count)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = build_classifier(make_fusion("sum", 8), [5, 3], 2, encoder_units=8, head_units=8)
    # Whole batches: a smaller last batch would be traced once more, for its shape.
    history, _ = fit_classifier(model, two_informative_modalities(rng, 64), 2, batch_size=32,
                                modality_weight=modality_weight)
    assert len(history["loss"]) == 2
    assert len(traces) == 1


def test_the_width_rule_follows_the_classes_and_the_views():
    from keras_mmfusion.training import RECIPE, units_for

    # Two classes: the ROSMAP recipe's width, which the rule keeps.
    assert units_for(2, [200, 200, 200]) == RECIPE.units == 8
    assert units_for(10, [240, 76, 216]) == 64
    assert units_for(15, [20, 59, 40]) == 64
    assert units_for(100, [1024, 512]) == 128
    # No wider than the widest view (rounded up to a power of two), and never below 8.
    assert units_for(100, [20, 30]) == 32
    assert units_for(10, [3, 2]) == 8
