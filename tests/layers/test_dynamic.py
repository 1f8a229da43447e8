import json

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion.layers import ConcatFusion, DEQFusion, DynamicFusion
from keras_mmfusion.training import build_before_tracing

from helpers import fit_save_reload, random_inputs

WIDTHS = (3, 5)


class RowCounter(keras.layers.Layer):
    """Wraps a layer and counts the rows it is executed on (in any execution mode)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.rows = self.add_weight(shape=(), initializer="zeros", trainable=False, name="rows", dtype="int32")
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls", dtype="int32")

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, x, training=None):
        first = x[0] if isinstance(x, (list, tuple)) else x
        self.rows.assign_add(tf.shape(first)[0])
        self.calls.assign_add(1)
        return self.inner(x)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)


class FixedGate(keras.layers.Layer):
    """Routes sample b to expert (feature 0 of modality 0 > 0); logits are +-10."""

    def call(self, x):
        pick = tf.cast(x[:, 0] > 0, "float32")
        return 10.0 * tf.stack([1.0 - 2.0 * pick, 2.0 * pick - 1.0], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)


def counted_layer(**kwargs):
    keras.utils.set_random_seed(0)
    experts = [RowCounter(keras.layers.Dense(4), name="cheap"), RowCounter(ConcatFusion(4), name="full")]
    return DynamicFusion(experts, gate=FixedGate(), expert_inputs=[[0], [0, 1]], **kwargs)


def test_hard_routing_equals_the_chosen_expert_on_each_sample_alone():
    layer = counted_layer()
    x = random_inputs(batch=9, widths=WIDTHS, seed=3)
    out = layer(x).numpy()
    route = layer.last_routing.numpy()
    np.testing.assert_array_equal(route, (x[0][:, 0] > 0).astype(int))
    assert 0 < route.sum() < 9
    for b in range(9):
        sample = [a[b : b + 1] for a in x]
        expert = layer.experts[route[b]]
        alone = expert(sample[0] if route[b] == 0 else sample).numpy()
        np.testing.assert_allclose(out[b], alone[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "tf_function"])
def test_experts_run_only_on_their_rows_and_an_unused_expert_does_not_run(mode):
    layer = counted_layer()
    call = layer if mode == "eager" else tf.function(lambda xs: layer(xs))
    x = random_inputs(batch=10, widths=WIDTHS, seed=3)
    expected_full = int((x[0][:, 0] > 0).sum())
    call(x)
    cheap, full = layer.experts
    assert int(full.rows) == expected_full and int(cheap.rows) == 10 - expected_full
    # A batch routed entirely to the cheap expert: the full expert executes on zero rows.
    x[0][:, 0] = -1.0
    before = (int(full.rows), int(full.calls))
    call(x)
    assert (int(full.rows), int(full.calls)) == before
    assert int(cheap.rows) == 20 - expected_full
    # A batch of one runs exactly one expert.
    single = [a[:1] for a in x]
    calls = (int(cheap.calls), int(full.calls))
    call(single)
    assert (int(cheap.calls), int(full.calls)) == (calls[0] + 1, calls[1])


def test_under_xla_every_expert_runs_masked_with_the_same_output():
    layer = counted_layer()
    x = random_inputs(batch=8, widths=WIDTHS, seed=3)
    eager = layer(x).numpy()
    xla = tf.function(lambda xs: layer(xs), jit_compile=True)(x).numpy()
    np.testing.assert_allclose(xla, eager, rtol=1e-5, atol=1e-6)


def test_gate_and_experts_receive_gradients_through_the_relaxed_weights():
    keras.utils.set_random_seed(0)
    layer = DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]], temperature=2.0)
    x = [tf.constant(a) for a in random_inputs(batch=16, widths=WIDTHS)]
    layer(x)
    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = tf.reduce_sum(tf.sin(out) * tf.range(1.0, 5.0))
    grads = dict(zip([w.path for w in layer.trainable_weights], tape.gradient(loss, layer.trainable_weights)))
    assert any("gate" in path for path in grads)
    for path, grad in grads.items():
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, path


def test_straight_through_forward_is_the_hard_choice():
    layer = counted_layer(temperature=3.0)
    x = random_inputs(batch=6, widths=WIDTHS, seed=3)
    np.testing.assert_allclose(layer(x, training=True).numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
    soft = counted_layer(temperature=100.0, straight_through=False)
    assert not np.allclose(soft(x, training=True).numpy(), soft(x).numpy())


def routing_task(seed=0):
    inputs, labels = mmf.make_synthetic(600, num_modalities=2, widths=8, noise=0.5, easy_fraction=0.5, seed=seed)
    return inputs, labels


def routed_model(cost_weight, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = [keras.Input((8,)), keras.Input((8,))]
    cheap = keras.Sequential([keras.layers.Dense(8, activation="relu")])
    full = keras.Sequential([keras.layers.Concatenate(), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(8, activation="relu")])
    layer = DynamicFusion([cheap, full], expert_inputs=[[0], [0, 1]], cost_weight=cost_weight, name="dynmm")
    outputs = keras.layers.Dense(2, activation="softmax")(layer(inputs))
    return keras.Model(inputs, outputs), layer


def test_raising_cost_weight_moves_routing_to_the_cheaper_expert():
    x, y = routing_task()
    fractions = {}
    for weight in (0.0, 2.0):
        model, layer = routed_model(weight)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        build_before_tracing(model, x, y)
        history = model.fit(x, y, epochs=8, batch_size=64, verbose=0)
        assert {"dynmm_cost", "dynmm_expert_0", "dynmm_expert_1"} <= set(history.history)
        model.predict(x, batch_size=600, verbose=0)
        fractions[weight] = float(np.mean(layer.last_routing.numpy() == 0))
    assert layer.costs[0] < layer.costs[1]
    assert fractions[2.0] > fractions[0.0] + 0.2, fractions


def test_jit_compiled_training_logs_routing_and_reaches_the_cost_loss():
    x, y = routing_task(1)
    model, layer = routed_model(0.5)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", jit_compile=True)
    build_before_tracing(model, x, y)
    history = model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    fractions = history.history["dynmm_expert_0"][-1] + history.history["dynmm_expert_1"][-1]
    assert fractions == pytest.approx(1.0, abs=1e-5)
    assert 0 < history.history["dynmm_cost"][-1] <= 1.0


def test_temperature_schedule_anneals_exponentially():
    x, y = routing_task()
    model, layer = routed_model(0.0)
    model.compile("adam", "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    schedule = mmf.TemperatureSchedule(start=4.0, end=0.25, epochs=5)
    history = model.fit(x, y, epochs=5, batch_size=200, verbose=0, callbacks=[schedule])
    expected = [4.0 * (0.25 / 4.0) ** (e / 4) for e in range(5)]
    np.testing.assert_allclose(history.history["dynmm_temperature"], expected, rtol=1e-6)
    assert layer.temperature == pytest.approx(0.25)


def test_routed_objective_selects_the_epoch_by_validation_loss_plus_cost():
    x, y = routing_task()
    vx, vy = routing_task(2)
    model, layer = routed_model(0.5)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    objective = mmf.RoutedObjective(0.5)
    keep = keras.callbacks.EarlyStopping(objective.name, mode="min", patience=10, restore_best_weights=True)
    history = model.fit(x, y, validation_data=(vx, vy), epochs=6, batch_size=64, verbose=0,
                        callbacks=[objective, keep]).history
    logged = np.asarray(history["val_dynmm_objective"])
    np.testing.assert_allclose(logged, np.asarray(history["val_loss"]) + 0.5 * np.asarray(history["val_dynmm_cost"]),
                               rtol=1e-6)
    # The restored weights are those of the epoch with the lowest logged objective.
    final = model.evaluate(vx, vy, batch_size=32, verbose=0, return_dict=True)
    assert final["loss"] + 0.5 * final["dynmm_cost"] == pytest.approx(logged.min(), rel=1e-5)


def test_routed_objective_rejects_bad_arguments_and_missing_logs():
    with pytest.raises(ValueError, match="cost_weight"):
        mmf.RoutedObjective(-1.0)
    with pytest.raises(ValueError, match="val_dynmm_cost"):
        mmf.RoutedObjective(0.1).on_epoch_end(0, {"val_loss": 0.3})


def test_keras_save_and_load_in_safe_mode_with_a_deq_expert(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = [keras.Input((w,)) for w in WIDTHS]
    layer = DynamicFusion(
        [keras.layers.Dense(8), DEQFusion(8, max_iter=6)], expert_inputs=[[0], [0, 1]], cost_weight=0.1, temperature=2.0
    )
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(layer(inputs)))
    x = random_inputs(batch=16, widths=WIDTHS)
    loaded = fit_save_reload(model, x, tmp_path / "dynmm.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    clone = [l for l in loaded.layers if isinstance(l, DynamicFusion)][0]
    # Shapes in the nested build configs come back as lists instead of tuples.
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(layer.get_config(), sort_keys=True)
    assert clone.costs == layer.costs and layer.costs[1] > layer.costs[0]


def test_measured_costs_count_the_expert_and_gate_macs():
    layer = DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]], gate_units=16)
    layer(random_inputs(widths=WIDTHS))
    gate = 8 * 16 + 16 * 2
    assert layer.costs == [3 * 4 + gate, 8 * 4 + gate]
    custom = DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]], costs=[1, 3])
    custom(random_inputs(widths=WIDTHS))
    assert custom.costs == [1.0, 3.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expert_inputs=[[0], [0, 2]]), r"expert_inputs\[1\] names modality 2, but the layer is called on 2 modalities"),
        (dict(experts=[keras.layers.Dense(4), ConcatFusion(5)]), "every expert must return the same shape"),
    ],
)
def test_bad_configuration_detected_at_build(kwargs, message):
    options = dict(experts=[keras.layers.Dense(4), ConcatFusion(4)], expert_inputs=[[0], [0, 1]])
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DynamicFusion(**options)(random_inputs(widths=WIDTHS))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(costs=[1.0]), "costs has 1 entries but there are 2 experts"),
        (dict(costs=[1.0, -2.0]), "costs must be finite and >= 0"),
        (dict(expert_inputs=[[0]]), "expert_inputs has 1 entries"),
        (dict(expert_inputs=[[0], []]), r"expert_inputs\[1\] must be a non-empty list"),
        (dict(temperature=0.0), "temperature"),
        (dict(cost_weight=-1.0), "cost_weight"),
        (dict(experts=[keras.layers.Dense(4)]), "at least 2 Keras layers"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    options = dict(experts=[keras.layers.Dense(4), ConcatFusion(4)])
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DynamicFusion(**options)
