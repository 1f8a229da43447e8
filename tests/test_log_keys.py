"""Log keys of layer statistics: short with one such layer in a model, unique with several."""

import keras
import numpy as np

from keras_mmfusion import ConcatFusion, DEQFusion, DynamicFusion
from keras_mmfusion.training import build_before_tracing


def fit_logs(model, widths, epochs=1):
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((32, w)).astype("float32") for w in widths]
    y = rng.integers(0, 2, 32)
    model.compile("adam", "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    history = model.fit(x, y, batch_size=16, epochs=epochs, validation_data=(x, y), verbose=0)
    return {key: values[-1] for key, values in history.history.items()}


def two_pairs(fuse_a, fuse_b, widths=(4, 4, 4, 4)):
    inputs = [keras.Input((w,)) for w in widths]
    fused = keras.layers.Concatenate()([fuse_a(inputs[:2]), fuse_b(inputs[2:])])
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(fused)), widths


def deq(name, max_iter):
    # tol far below reach: every solve takes exactly max_iter steps, so each layer's steps are its own.
    return DEQFusion(8, max_iter=max_iter, tol=1e-6, jacobian_weight=0.0, name=name)


def test_two_deq_layers_log_under_their_names():
    model, widths = two_pairs(deq("fusion_a", 3), deq("fusion_b", 5))
    logs = fit_logs(model, widths)
    assert logs["fusion_a_deq_steps"] == 3 and logs["fusion_b_deq_steps"] == 5, logs
    assert logs["val_fusion_a_deq_steps"] == 3 and logs["val_fusion_b_deq_steps"] == 5, logs
    assert "deq_steps" not in logs and "deq_residual" not in logs, sorted(logs)
    assert {"fusion_a_deq_residual", "fusion_b_deq_residual", "fusion_a_deq_converged"} <= set(logs)


def routed(name, expert):
    """DynMM over two inputs whose gate always picks ``expert`` (0: the first input alone, 1: both)."""
    gate = keras.layers.Dense(2, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(
        [10.0, -10.0] if expert == 0 else [-10.0, 10.0]), trainable=False)
    return DynamicFusion([keras.layers.Dense(4), ConcatFusion(4)], gate=gate, expert_inputs=[[0], [0, 1]], name=name)


def test_two_dynmm_layers_log_under_their_names_and_one_deq_keeps_its_own():
    inputs = [keras.Input((4,)) for _ in range(6)]
    fused = keras.layers.Concatenate()([
        routed("route_a", 0)(inputs[:2]), routed("route_b", 1)(inputs[2:4]), deq("fusion", 4)(inputs[4:])
    ])
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(fused))
    logs = fit_logs(model, (4,) * 6)
    assert logs["route_a_dynmm_expert_0"] == 1.0 and logs["route_b_dynmm_expert_1"] == 1.0, logs
    assert "dynmm_cost" not in logs and {"route_a_dynmm_cost", "route_b_dynmm_cost"} <= set(logs)
    # The one DEQ layer keeps the short keys, in training and validation alike.
    assert logs["deq_steps"] == 4 and "val_deq_steps" in logs and "deq_converged" in logs, sorted(logs)
    assert not any(key.startswith("fusion_") for key in logs), sorted(logs)
