import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_mmfusion.layers import (
    ConcatFusion,
    DenseFusion,
    GatedFusion,
    LowRankTensorFusion,
    SumFusion,
    TensorFusion,
)
from keras_mmfusion.training import build_before_tracing

from helpers import (BAD_FUSION_INPUTS, fit_and_score, fit_save_reload, fusion_classifier, linear_classifier,
                     random_inputs, synthetic_split)

WIDTHS = (3, 5, 4)

# name -> (factory, expected output width for WIDTHS)
LAYERS = {
    "concat": (lambda: ConcatFusion(), 12),
    "concat_projected": (lambda: ConcatFusion(6, activation="relu"), 6),
    "sum": (lambda: SumFusion(6), 6),
    "mean": (lambda: SumFusion(6, mode="mean", activation="tanh"), 6),
    "gated": (lambda: GatedFusion(6), 6),
    "tensor": (lambda: TensorFusion(), 4 * 6 * 5),
    "tensor_projected": (lambda: TensorFusion(6), 6),
    "lowrank": (lambda: LowRankTensorFusion(6, rank=3), 6),
    "dense": (lambda: DenseFusion(6, depth=3, normalization="layer", dropout=0.05, seed=1), 6),
    "dense_narrowing": (lambda: DenseFusion(6, depth=3, modality_units=[5, 4, 3], normalization="layer", dropout=0.1,
                                            seed=1), 6),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_output_shape_and_compute_output_shape(name):
    factory, width = LAYERS[name]
    layer = factory()
    out = layer(random_inputs(batch=7, widths=WIDTHS))
    assert tuple(out.shape) == (7, width)
    assert layer.compute_output_shape([(None, w) for w in WIDTHS]) == (None, width)
    symbolic = layer([keras.Input((w,)) for w in WIDTHS])
    assert tuple(symbolic.shape) == (None, width)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_get_config_round_trips(name):
    layer = LAYERS[name][0]()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


# DenseFusion is saved with its narrowing stacks, which hold every option of the uniform one.
@pytest.mark.parametrize("name", [n for n in sorted(LAYERS) if n != "dense"])
def test_keras_save_and_load_in_safe_mode(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = fusion_classifier(LAYERS[name][0](), WIDTHS, units=8)
    x = random_inputs(batch=16, widths=WIDTHS)
    loaded = fit_save_reload(model, x, tmp_path / f"{name}.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_weight_gets_a_gradient(name):
    layer = LAYERS[name][0]()
    x = [tf.constant(a) for a in random_inputs(batch=6, widths=WIDTHS)]
    layer(x)
    assert layer.trainable_weights or name in ("concat", "tensor")
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, training=True)
        loss = tf.reduce_sum(tf.sin(out) * tf.range(1.0, out.shape[-1] + 1.0))
    grads = tape.gradient(loss, layer.trainable_weights + x)
    for weight, grad in zip(layer.trainable_weights + x, grads):
        label = getattr(weight, "path", "input")
        assert grad is not None, label
        assert float(tf.reduce_max(tf.abs(grad))) > 0, label


@pytest.mark.parametrize("name", ["concat_projected", "gated", "tensor_projected", "lowrank", "dense"])
def test_jit_compiled_training_lowers_the_loss(name):
    keras.utils.set_random_seed(0)
    x = random_inputs(batch=64, widths=WIDTHS, seed=2)
    # A label every layer can fit from both modalities: the test is about the compiled
    # training step, and an interaction label left some initialisations stuck at chance.
    y = (x[0][:, 0] + x[1][:, 0] > 0).astype("int32")
    model = fusion_classifier(LAYERS[name][0](), WIDTHS, units=8)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", jit_compile=True)
    assert model.jit_compile
    build_before_tracing(model, x, y)  # one trace and one XLA compilation of the step
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] - 0.1, history.history["loss"]


def test_lowrank_equals_tensor_fusion_with_the_factorised_weight():
    x = [tf.constant(a, tf.float64) for a in random_inputs(batch=5, widths=(2, 3, 2), dtype="float64")]
    lmf = LowRankTensorFusion(4, rank=3, dtype="float64")
    expected_lmf = lmf(x)
    # W[(i1, i2, i3), u] = sum_r lambda_r W_1[r, i1, u] W_2[r, i2, u] W_3[r, i3, u],
    # flattened in the same row-major order as TensorFusion's outer product.
    f1, f2, f3 = (f.numpy() for f in lmf.factors)
    full = np.einsum("r,riu,rju,rku->ijku", lmf.rank_weights.numpy(), f1, f2, f3)
    full = full.reshape(-1, 4)
    tfn = TensorFusion(4, dtype="float64")
    tfn(x)
    assert tfn.projection.kernel.shape == full.shape == (3 * 4 * 3, 4)
    tfn.projection.kernel.assign(full)
    tfn.projection.bias.assign(lmf.bias.numpy())
    np.testing.assert_allclose(tfn(x).numpy(), expected_lmf.numpy(), rtol=1e-12, atol=1e-12)
    assert float(tf.reduce_max(tf.abs(expected_lmf))) > 1e-3


def test_tensor_fusion_holds_every_product_of_the_augmented_inputs():
    a, b = np.array([[2.0, 3.0]], "float32"), np.array([[5.0]], "float32")
    out = TensorFusion()([a, b]).numpy()
    np.testing.assert_allclose(out, [[10.0, 2.0, 15.0, 3.0, 5.0, 1.0]])


def test_gated_fusion_of_two_modalities_is_a_convex_combination_of_the_candidates():
    x = random_inputs(batch=4, widths=(3, 5))
    layer = GatedFusion(6)
    out = layer(x).numpy()
    h = np.stack([c(xi).numpy() for c, xi in zip(layer.candidates, x)])
    assert np.all(out <= h.max(0) + 1e-6) and np.all(out >= h.min(0) - 1e-6)


def test_dense_fusion_returns_every_level_and_matches_the_equations():
    x = [tf.constant(a) for a in random_inputs(batch=3, widths=(3, 5))]
    layer = DenseFusion(4, depth=2, return_all_levels=True)
    levels = layer(x)
    assert [tuple(s.shape) for s in levels] == [(3, 4), (3, 4)]
    relu = lambda v: np.maximum(v, 0)  # noqa: E731

    def dense(d, v):
        return v @ d.kernel.numpy() + (d.bias.numpy() if d.use_bias else 0)

    h = [relu(dense(layer.modality_stacks[i][0], x[i].numpy())) for i in range(2)]
    s1 = relu(dense(layer.shared[0], np.concatenate(h, -1)))
    h = [relu(dense(layer.modality_stacks[i][1], h[i])) for i in range(2)]
    s2 = relu(dense(layer.shared[1], np.concatenate(h, -1)) + dense(layer.recurrent[0], s1))
    np.testing.assert_allclose(levels[0].numpy(), s1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(levels[1].numpy(), s2, rtol=1e-5, atol=1e-6)
    assert layer.recurrent[0].use_bias is False and len(layer.recurrent) == 1


@pytest.mark.parametrize("factory", [lambda: ConcatFusion(4), lambda: GatedFusion(4), lambda: DenseFusion(4)])
@pytest.mark.parametrize("inputs, message", BAD_FUSION_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_problem(factory, inputs, message):
    with pytest.raises(ValueError, match=message):
        factory()(inputs)


def test_built_layer_rejects_other_widths():
    layer = LowRankTensorFusion(4)
    layer(random_inputs(widths=(3, 5)))
    with pytest.raises(ValueError, match=r"input 1 must have shape \(batch, 5\)"):
        layer(random_inputs(widths=(3, 6)))


def test_tensor_fusion_refuses_a_fused_width_above_the_limit():
    inputs = [keras.Input((127,)), keras.Input((127,)), keras.Input((127,))]
    with pytest.raises(ValueError, match=r"fused width prod\(d_i \+ 1\) .* is 2097152, above max_fused_width=1048576"):
        TensorFusion(8)(inputs)
    assert TensorFusion(max_fused_width=2**21)(inputs).shape[-1] == 128**3


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: SumFusion(4, mode="max"), "mode must be 'sum' or 'mean'"),
        (lambda: GatedFusion(None), "units must be a positive integer"),
        (lambda: ConcatFusion(0), "units must be None or a positive integer"),
        (lambda: LowRankTensorFusion(4, rank=0), "rank"),
        (lambda: DenseFusion(4, depth=2, modality_units=[4, 4, 4]), "modality_units must be one int or a list of depth=2"),
        (lambda: DenseFusion(4, dropout=1.0), "dropout"),
        (lambda: DenseFusion(4, normalization="batch"), "normalization"),
    ],
)
def test_bad_constructor_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_sum_fusion_without_units_needs_equal_widths():
    with pytest.raises(ValueError, match=r"widths \[3, 5\] differ"):
        SumFusion()(random_inputs(widths=(3, 5)))
    np.testing.assert_allclose(
        SumFusion(mode="mean")([np.ones((2, 3)), 3 * np.ones((2, 3))]).numpy(), 2 * np.ones((2, 3))
    )


# The synthetic task needs fusion: no single modality and no linear model solves it.

@pytest.fixture(scope="module")
def synthetic():
    return synthetic_split()


@pytest.fixture(scope="module")
def single_modality_best(synthetic):
    widths, (x, y), (xt, yt) = synthetic
    scores = []
    for i in range(len(widths)):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((widths[i],))
        hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Dense(16, activation="relu")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
        scores.append(fit_and_score(model, (x[i], y), (xt[i], yt)))
    return max(scores)


@pytest.mark.parametrize("name", ["concat", "sum", "gated", "tensor_projected", "lowrank", "dense"])
def test_every_fusion_layer_beats_the_best_single_modality(name, synthetic, single_modality_best):
    widths, train, test = synthetic
    keras.utils.set_random_seed(1)
    accuracy = fit_and_score(fusion_classifier(LAYERS[name][0](), widths), train, test, epochs=25)
    assert single_modality_best < 0.62
    assert accuracy > single_modality_best + 0.15, (accuracy, single_modality_best)


def test_concat_fusion_without_hidden_layer_stays_near_the_linear_baseline(synthetic):
    widths, train, test = synthetic
    keras.utils.set_random_seed(0)
    linear = fit_and_score(linear_classifier(widths), train, test, epochs=15, lr=1e-2)
    inputs = [keras.Input((w,)) for w in widths]
    outputs = keras.layers.Dense(2, activation="softmax")(ConcatFusion()(inputs))
    keras.utils.set_random_seed(0)
    concat = fit_and_score(keras.Model(inputs, outputs), train, test, epochs=15, lr=1e-2)
    assert linear < 0.62 and abs(concat - linear) < 0.05, (concat, linear)
