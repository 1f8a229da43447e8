"""The reference classifier of DEQ fusion's multi-omics experiments and its two layers."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion import export
from keras_mmfusion.layers import ConfidenceHead, FeatureGate, training_labels
from keras_mmfusion.training import build_before_tracing

WIDTHS = (6, 10, 8)


@pytest.fixture(scope="module")
def data():
    x, y = mmf.make_synthetic(500, num_modalities=3, widths=list(WIDTHS), noise=0.3, seed=3)
    return [a * 3.0 + 1.0 for a in x], y


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    keras.utils.set_random_seed(0)
    model = mmf.models.build_reference_classifier(WIDTHS, 2, units=8, standardize_with=x)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    build_before_tracing(model, x, y)
    history = model.fit(x, y, epochs=3, batch_size=100, verbose=0)
    return model, history.history


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def test_training_adds_each_layers_loss_as_its_formula_says(trained, data):
    model, history = trained
    x, y = data
    xs, labels = [a[:32] for a in x], y[:32]
    with training_labels(tf.constant(labels)):
        model(xs, training=True)
    # Recompute the layers' losses in NumPy from the layers' own inputs and weights. The
    # dropout masks differ between calls, so the confidence heads are checked on their
    # inputs from the same training call, read through a model that returns them.
    gates = [model.get_layer(f"feature_gate_{i}") for i in range(3)]
    heads = [model.get_layer(f"confidence_{i}") for i in range(3)]
    gate_inputs = keras.Model(model.inputs, [g.input for g in gates])(xs)
    for gate, inp in zip(gates, gate_inputs):
        value = sigmoid(np.asarray(inp) @ gate.dense.kernel.numpy() + gate.dense.bias.numpy()).mean()
        np.testing.assert_allclose(float(gate.losses[0]), gate.sparsity_weight * value, rtol=1e-5)
    probe = keras.Model(model.inputs, [h.input for h in heads])
    with training_labels(tf.constant(labels)):
        head_inputs = [np.asarray(t) for t in probe(xs, training=False)]
        for head, h in zip(heads, head_inputs):
            head(h, training=True)
            logits = h @ head.classifier.kernel.numpy() + head.classifier.bias.numpy()
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            p_true = probs[np.arange(len(labels)), labels]
            confidence = (h @ head.confidence.kernel.numpy() + head.confidence.bias.numpy())[:, 0]
            expected = np.mean((confidence - p_true) ** 2) + np.mean(-np.log(p_true))
            np.testing.assert_allclose(float(head.losses[-1]), expected, rtol=1e-5)
    for key in ["feature_gate_0_sparsity", "confidence_2_loss", "deq_converged", "loss", "accuracy"]:
        assert key in history, sorted(history)
    assert 0 < history["feature_gate_1_sparsity"][-1] < 1
    assert history["confidence_0_loss"][-1] > 0


def test_saves_in_safe_mode_and_exports_probabilities_only(trained, data, tmp_path):
    model, _ = trained
    x, _ = data
    xs = [a[:16] for a in x]
    model.save(tmp_path / "reference.keras")
    loaded = keras.saving.load_model(tmp_path / "reference.keras", safe_mode=True)
    assert type(loaded) is mmf.models.ReferenceClassifier
    np.testing.assert_array_equal(loaded.predict(xs, verbose=0), model.predict(xs, verbose=0))
    for path in (export.to_saved_model(model, tmp_path / "serving"), export.to_tflite(model, tmp_path / "r.tflite")):
        outputs = export.run_export(path, dict(zip(export.input_names(model), xs)))
        assert list(outputs) == ["probabilities"]
        # The solve stops at a relative residual of 1e-4. A runtime that rounds differently
        # may stop one step earlier or later (test_export_solver.py compares the steps),
        # which moves these probabilities by about 1e-4; a wrong weight or scaling moves them by far more.
        assert export.verify_export(model, path, xs)["probabilities"]["max_abs"] <= 1e-3


def test_fusion_options_can_set_a_narrower_deq_state_than_the_encoders(data):
    x, _ = data
    model = mmf.models.build_reference_classifier(WIDTHS, 2, units=8, fusion_options={"units": 4})
    layer = model.get_layer("deq_fusion")
    assert layer.units == 4 and model.get_layer("encoder_0").units == 8
    assert [p.units for p in layer.projections] == [4, 4, 4]
    assert model.predict([a[:5] for a in x], verbose=0).shape == (5, 2)


def test_trains_under_mixed_float16_with_float32_probabilities(data):
    # The gates and the confidence heads (with the labels handed to them) computing in
    # float16 under loss scaling, the DEQ solver state in float32. benchmarks/gpu_check.py
    # trains this classifier under XLA.
    x, y = data
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = mmf.models.build_reference_classifier(WIDTHS, 2, units=8, standardize_with=x)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    history = model.fit(x, y, epochs=3, batch_size=100, verbose=0).history
    for key in ("loss", "feature_gate_0_sparsity", "confidence_0_loss", "deq_residual"):
        assert np.all(np.isfinite(history[key])), (key, history[key])
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert history["deq_converged"][-1] > 0.9, history["deq_converged"]
    assert model.get_layer("confidence_0").compute_dtype == "float16"
    assert model.get_layer("deq_fusion").last_stats["residual"].dtype == "float32"
    probabilities = model.predict([a[:8] for a in x], verbose=0)
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_layers_shapes_and_configs_round_trip():
    gate = FeatureGate(sparsity_weight=0.5, name="g")
    assert tuple(gate(np.ones((3, 5), "float32")).shape) == (3, 5)
    assert FeatureGate.from_config(gate.get_config()).get_config() == gate.get_config()
    head = ConfidenceHead(num_classes=4, loss_weight=0.25, name="c",
                          kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))
    assert tuple(head(np.ones((3, 7), "float32")).shape) == (3, 7)
    assert ConfidenceHead.from_config(head.get_config()).get_config() == head.get_config()
    assert head.get_config()["kernel_initializer"]["config"]["stddev"] == 0.5
    assert head.classifier.kernel_initializer is not head.confidence.kernel_initializer


def test_kernel_initializer_reaches_every_kernel_outside_the_update_with_its_own_draws(tmp_path):
    """The reference code's untruncated Xavier normal: tails past two standard deviations,
    which Keras's Glorot normal cuts off, and no two kernels of one shape equal."""
    xavier_normal = {"class_name": "VarianceScaling",
                     "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "untruncated_normal"}}
    keras.utils.set_random_seed(0)
    widths = [200, 200, 200]
    model = mmf.models.build_reference_classifier(widths, 2, units=300, kernel_initializer=xavier_normal,
                                       fusion_options={"max_iter": 2})
    kernels = {}
    for i in range(3):
        kernels[f"gate_{i}"] = model.get_layer(f"feature_gate_{i}").dense.kernel
        kernels[f"encoder_{i}"] = model.get_layer(f"encoder_{i}").kernel
        head = model.get_layer(f"confidence_{i}")
        kernels[f"classifier_{i}"], kernels[f"confidence_{i}"] = head.classifier.kernel, head.confidence.kernel
    kernels["probabilities"] = model.get_layer("probabilities").kernel
    for name, kernel in kernels.items():
        w = np.asarray(kernel.numpy())
        fan_in, fan_out = w.shape
        std = np.sqrt(2.0 / (fan_in + fan_out))
        assert np.std(w) == pytest.approx(std, rel=0.25 if w.size < 1000 else 0.03), name
        if w.size >= 40000:  # P(|w| > 2.5 std) = 1.2%: hundreds of such values
            assert np.mean(np.abs(w) > 2.5 * std) > 0.008, name
    values = [np.asarray(k.numpy()) for k in kernels.values()]
    assert not any(a.shape == b.shape and np.array_equal(a, b) for i, a in enumerate(values) for b in values[:i])
    # The default keeps Keras's truncated Glorot normal.
    truncated = mmf.models.build_reference_classifier(widths, 2, units=300, fusion_options={"max_iter": 2})
    w = np.asarray(truncated.get_layer("encoder_0").kernel.numpy())
    assert np.max(np.abs(w)) < 2.01 * np.sqrt(2.0 / 500) / 0.87962566103423978
    # The option is in the saved config: a loaded model is built with it.
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for layer in ("confidence_1", "feature_gate_1", "encoder_1", "probabilities"):
        config = loaded.get_layer(layer).get_config()
        assert config["kernel_initializer"]["config"]["distribution"] == "untruncated_normal", layer


def test_confidence_head_without_labels_in_training_names_the_problem():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(ConfidenceHead(2, name="conf")(inputs)))
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="ConfidenceHead 'conf' needs the batch's labels in training"):
        model.fit(np.ones((8, 6), "float32"), np.zeros(8, "int32"), verbose=0)
    model.predict(np.ones((2, 6), "float32"), verbose=0)  # inference needs no labels


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mmf.models.build_reference_classifier(WIDTHS, 2, units=0), "units must be an integer >= 1"),
        (lambda: mmf.models.build_reference_classifier((6, -3), 2), r"input_widths\[1\] must be an integer >= 1"),
        (lambda: mmf.models.build_reference_classifier(WIDTHS, 1), "num_classes must be an integer >= 2"),
        (lambda: ConfidenceHead(num_classes=0), "num_classes must be an integer >= 2"),
        (lambda: FeatureGate(name="g")(np.ones((2, 3, 4), "float32")),
         r"FeatureGate 'g' gates the features of \(batch, features\) inputs; got an input of shape \(2, 3, 4\)"),
        (lambda: FeatureGate(sparsity_weight=-1), "sparsity_weight must be a number >= 0"),
    ],
)
def test_bad_arguments_and_inputs_raise_value_errors_that_name_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()
