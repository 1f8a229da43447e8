"""fixed_summation_order: repeated DEQ gradients are bit-identical inside it, and fit_classifier trains in it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mmfusion as mmf
from keras_mmfusion.training import fit_classifier, fixed_summation_order
from keras_mmfusion.training.reproducibility import REWRITE


def rewrite_on():
    return tf.config.optimizer.get_experimental_options().get(REWRITE, True)


@pytest.fixture(autouse=True)
def _grapplers_default():
    """The arithmetic rewrites on, as users have them (conftest.py turns them off)."""
    before = rewrite_on()
    tf.config.optimizer.set_experimental_options({REWRITE: True})
    yield
    tf.config.optimizer.set_experimental_options({REWRITE: before})


def test_a_deq_classifiers_gradient_repeats_bit_for_bit_and_the_setting_is_restored():
    widths = [6, 10, 8]
    x, _ = mmf.make_synthetic(64, num_modalities=3, widths=widths, noise=0.5, seed=0)
    xs = [tf.constant(a) for a in x]
    # No Jacobian penalty: its probes are new random draws at every call.
    model = mmf.models.build_classifier(mmf.DEQFusion(8, jacobian_weight=0.0), widths, 2, encoder_units=8,
                                        head_units=8)
    model(xs)
    assert rewrite_on()
    with fixed_summation_order():
        assert not rewrite_on()

        @tf.function
        def gradient():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(xs, training=True)[:, 0])
            return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, model.trainable_weights)], 0)

        # With the rewrite on, about a quarter of these calls differed from the one before
        # (the Anderson solves' gradients, TensorFlow's default inter-op threads).
        first = gradient().numpy()
        assert np.abs(first).max() > 0
        for _ in range(30):
            np.testing.assert_array_equal(gradient().numpy(), first)
    assert rewrite_on()
    with pytest.raises(RuntimeError):
        with fixed_summation_order():
            raise RuntimeError("inside")
    assert rewrite_on()


def test_fit_classifier_trains_with_the_fixed_order():
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(rewrite_on()))
    x, y = mmf.make_synthetic(32, num_modalities=2, widths=[3, 4], seed=0)
    model = mmf.models.build_classifier(keras.layers.Concatenate(), [3, 4], 2, encoder_units=4, head_units=4)
    fit_classifier(model, (x, y), epochs=1, callbacks=[record])
    assert seen == [False] and rewrite_on()
