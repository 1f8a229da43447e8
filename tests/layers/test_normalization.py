import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_mmfusion.layers.normalization import ExactGroupNormalization


def pair(groups=2, width=8, dtype="float64", rank=2):
    """An ExactGroupNormalization and a Keras GroupNormalization with equal, non-trivial weights."""
    rng = np.random.default_rng(0)
    exact = ExactGroupNormalization(groups=groups, dtype=dtype)
    reference = keras.layers.GroupNormalization(groups=groups, dtype=dtype)
    for layer in (exact, reference):
        layer.build((None,) * (rank - 1) + (width,))
    gamma, beta = rng.normal(size=width) + 1.0, rng.normal(size=width)
    for layer in (exact, reference):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return exact, reference


@pytest.mark.parametrize("groups, shape", [(2, (5, 8)), (1, (5, 8)), (2, (5, 3, 8)), (1, (5, 3, 8))])
def test_value_and_first_derivatives_equal_keras_group_normalization(groups, shape):
    # One group takes a path of its own, without reshapes.
    exact, reference = pair(groups, rank=len(shape))
    x = tf.constant(np.random.default_rng(1).normal(size=shape) * 3.0 + 1.0)
    weights = tf.constant(np.random.default_rng(2).normal(size=shape))
    grads = []
    for layer in (exact, reference):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)) * weights)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    np.testing.assert_allclose(exact(x), reference(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def penalty_derivative(layer, x, mixing, direction, probe):
    """``||probe^T d layer(x A)/dx||^2`` and its derivative along ``direction``, by autodiff.

    The linear map ``A`` in front matters: with respect to the normalised input itself,
    the terms that ``tf.nn.moments`` drops cancel (a vector-Jacobian product of group
    normalisation sums to zero over every group), as they do not through a Dense layer.
    """
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x @ mixing)
        value = tf.reduce_sum(tf.square(inner.gradient(y, x, output_gradients=probe)))
    return float(value), float(tf.reduce_sum(outer.gradient(value, x) * direction))


@pytest.mark.parametrize("groups", [2, 1])
def test_second_derivatives_match_finite_differences_where_keras_does_not(groups):
    exact, reference = pair(groups)
    rng = np.random.default_rng(3)
    x, direction, probe = (tf.constant(rng.normal(size=(4, 8))) for _ in range(3))
    mixing = tf.constant(rng.normal(size=(8, 8)))
    h = 1e-5
    up, _ = penalty_derivative(exact, x + h * direction, mixing, direction, probe)
    down, _ = penalty_derivative(exact, x - h * direction, mixing, direction, probe)
    fd = (up - down) / (2 * h)
    _, exact_derivative = penalty_derivative(exact, x, mixing, direction, probe)
    _, keras_derivative = penalty_derivative(reference, x, mixing, direction, probe)
    assert abs(exact_derivative - fd) < 1e-6 * abs(fd), (exact_derivative, fd)
    # tf.nn.moments stops the gradient through the mean, so Keras's layer is off here.
    assert abs(keras_derivative - fd) > 1e-3 * abs(fd), (keras_derivative, fd)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_half_precision_inputs_are_normalised_in_float32(policy):
    layer = ExactGroupNormalization(groups=2, dtype=policy)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32") * 100.0 + 500.0
    y = layer(tf.cast(x, layer.compute_dtype))
    assert y.dtype == tf.as_dtype(layer.compute_dtype)
    grouped = x.reshape(3, 2, 4)
    expected = ((grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-3))
    np.testing.assert_allclose(tf.cast(y, tf.float32), expected.reshape(3, 8), atol=0.05)


def test_config_round_trips_and_other_axes_are_refused():
    layer = ExactGroupNormalization(groups=4, epsilon=1e-5, name="gn")
    assert ExactGroupNormalization.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="normalises the last axis; got axis=1"):
        ExactGroupNormalization(groups=2, axis=1)(np.ones((2, 4, 6), "float32"))
