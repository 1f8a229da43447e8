"""Every fusion layer starts its weights from independent draws: one initializer shared by
its sub-layers must not start them equal."""

import itertools

import keras
import numpy as np
import pytest

import keras_mmfusion as mmf
from keras_mmfusion.models import fusion_names, make_fusion

WIDTHS = [6, 6, 6]


def built(name, **kwargs):
    layer = make_fusion(name, 6, num_modalities=len(WIDTHS), **kwargs)
    layer([np.ones((2, w), "float32") for w in WIDTHS])
    return layer


def equal_pairs(layer):
    """The paths of every two weights of one shape that hold the same values, zeros and
    ones (biases, normalisation scales) left out."""
    weights = [(w.path, np.asarray(w.numpy())) for w in layer.weights
               if not np.all(w.numpy() == 0) and not np.all(w.numpy() == 1)]
    return [(a, b) for (a, x), (b, y) in itertools.combinations(weights, 2)
            if x.shape == y.shape and np.array_equal(x, y)]


@pytest.mark.parametrize("name", [n for n in fusion_names() if n not in ("concat", "tensor")])  # one Dense each
def test_no_two_weights_of_a_fusion_layer_start_equal(name):
    layer = built(name)
    assert sum(w.ndim >= 2 for w in layer.weights) >= 2, [w.path for w in layer.weights]
    assert equal_pairs(layer) == []


def test_the_deq_update_draws_its_kernels_and_biases_independently_from_initializer_configs():
    # As the reference recipe gives them: one config for every kernel and every bias.
    scaling = {"class_name": "VarianceScaling", "config": {"scale": 1 / 3, "mode": "fan_in", "distribution": "uniform"}}
    layer = mmf.DEQFusion(6, kernel_initializer=scaling, bias_initializer=scaling)
    layer.build([(2, 6)] * 3)
    biases = [w for w in layer.weights if w.path.endswith("bias")]
    assert len(biases) >= 8
    assert equal_pairs(layer) == []


def test_a_seeded_initializer_gives_reproducible_and_distinct_draws():
    def kernels():
        layer = built("dmf", kernel_initializer=keras.initializers.GlorotUniform(seed=7))
        return [np.asarray(w.numpy()) for w in layer.weights if w.ndim == 2]

    first, second = kernels(), kernels()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert equal_pairs(built("dmf", kernel_initializer=keras.initializers.GlorotUniform(seed=7))) == []


def test_unseeded_draws_follow_the_global_seed():
    keras.utils.set_random_seed(3)
    a = [np.asarray(w.numpy()) for w in built("deq").weights]
    keras.utils.set_random_seed(3)
    b = [np.asarray(w.numpy()) for w in built("deq").weights]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
