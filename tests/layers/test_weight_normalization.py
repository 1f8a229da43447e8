import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mmfusion as mmf
from keras_mmfusion import export
from keras_mmfusion.layers import WeightNormalizedDense
from keras_mmfusion.training import build_before_tracing

from helpers import assert_weight_gradients_match_finite_differences


def test_a_new_layer_computes_dense_and_only_the_directions_length_is_free():
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    layer = WeightNormalizedDense(3, activation="relu")
    y = layer(x)
    kernel, bias, scale = layer.get_weights()
    assert [w.path.split("/")[-1] for w in layer.weights] == ["kernel", "bias", "scale"]
    np.testing.assert_allclose(scale, np.linalg.norm(kernel, axis=0), rtol=1e-6)
    np.testing.assert_allclose(y, np.maximum(x @ kernel + bias, 0), rtol=1e-5, atol=1e-6)
    # Rescaling a direction leaves the function alone; the scale sets each column's length.
    layer.set_weights([kernel * np.array([2.0, 0.5, 7.0], "float32"), bias, 2 * scale])
    np.testing.assert_allclose(layer(x), np.maximum(x @ (2 * kernel) + bias, 0), rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, 4)))
    layer = WeightNormalizedDense(2, activation="tanh", dtype="float64")
    layer(x)
    layer.scale.assign(layer.scale.numpy() * rng.uniform(0.5, 2.0, size=2))
    weights = tf.constant(rng.normal(size=(3, 2)))

    def value():
        return tf.reduce_sum(layer(x) * weights)

    with tf.GradientTape() as tape:
        out = value()
    grads = tape.gradient(out, layer.trainable_weights)
    assert_weight_gradients_match_finite_differences(value, layer.trainable_weights, grads, rng, h=1e-6, rtol=1e-7)


def test_config_round_trips_and_a_model_reloads_in_safe_mode(tmp_path):
    layer = WeightNormalizedDense(3, activation="relu", use_bias=False, name="wn")
    config = layer.get_config()
    assert WeightNormalizedDense.from_config(config).get_config() == config
    inputs = keras.Input((5,))
    model = keras.Model(inputs, WeightNormalizedDense(3, name="wn")(inputs))
    model.get_layer("wn").scale.assign([0.5, 1.0, 2.0])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert isinstance(loaded.get_layer("wn"), WeightNormalizedDense)
    x = np.random.default_rng(2).normal(size=(4, 5)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_mixed_precision_keeps_float32_weights_and_computes_in_float16():
    keras.config.set_dtype_policy("mixed_float16")
    layer = WeightNormalizedDense(3)
    y = layer(np.ones((2, 4), "float32"))
    assert y.dtype == tf.float16 and {w.dtype for w in layer.weights} == {"float32"}


def test_lora_and_quantization_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="WeightNormalizedDense 'wn' supports neither LoRA nor quantization"):
        WeightNormalizedDense(3, lora_rank=2, name="wn").build((None, 4))


def test_a_trained_weight_normalised_deq_classifier_exports_to_tflite_and_onnx(tmp_path):
    x, y = mmf.make_synthetic(128, num_modalities=2, widths=[6, 10], seed=0)
    keras.utils.set_random_seed(0)
    fusion = mmf.DEQFusion(8, kernel_normalization="weight", name="deq_fusion")
    model = mmf.models.build_classifier(fusion, [6, 10], 2, encoder_units=8, head_units=8)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    scales = [w for w in fusion.trainable_weights if w.path.endswith("scale")]
    assert len(scales) == 6 and all(np.any(w.numpy() != np.linalg.norm(k.numpy(), axis=0))
                                    for w, k in zip(scales, [w for w in fusion.trainable_weights
                                                            if w.path.endswith("kernel") and "block" in w.path]))
    path = export.to_tflite(model, tmp_path / "wn.tflite")
    ops = export.tflite_report(path)["ops"]
    assert "WHILE" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    for artefact in (path, export.to_onnx(model, tmp_path / "wn.onnx")):
        errors = export.verify_export(model, artefact, [a[:64] for a in x])
        assert errors["probabilities"]["max_rel"] <= 1e-4, (artefact, errors)
