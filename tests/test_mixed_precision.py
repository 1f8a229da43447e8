"""Mixed precision: every fusion layer trains under mixed_float16 and mixed_bfloat16, the
classifier's output is float32, the DEQ solver keeps float32 state and a tolerance its
update can reach, and accuracy stays within a point of float32 training."""

import keras
import numpy as np
import pytest

import keras_mmfusion as mmf
from keras_mmfusion.equilibrium.iteration import resolvable_tol
from keras_mmfusion.training import build_before_tracing

WIDTHS = [8, 8, 8]
NAMES = ["deq", "dynmm", "dmf", "concat", "sum", "gated", "tensor", "lowrank"]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def data():
    x, y = mmf.make_synthetic(1000, num_modalities=3, widths=WIDTHS, noise=0.3, seed=1)
    return ([a[:600] for a in x], y[:600]), ([a[600:] for a in x], y[600:])


def train(name, train_data, epochs):
    keras.utils.set_random_seed(0)
    fusion = mmf.models.make_fusion(name, 16, num_modalities=3)
    model = mmf.models.build_classifier(fusion, WIDTHS, 2, encoder_units=16, head_units=16)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, *train_data)
    history = model.fit(*train_data, epochs=epochs, batch_size=64, verbose=0).history
    return model, fusion, history


def test_the_tolerance_is_raised_to_what_the_compute_dtype_resolves():
    assert resolvable_tol(1e-4, "rel", "float32") == 1e-4
    assert resolvable_tol(1e-4, "rel", "float16") == pytest.approx(8 * 2**-10)
    assert resolvable_tol(1e-4, "rel", "bfloat16") == pytest.approx(8 * 2**-7)
    assert resolvable_tol(1e-4, "abs", "bfloat16") == 1e-4
    assert resolvable_tol(0.1, "rel", "bfloat16") == 0.1
    layer = mmf.DEQFusion(8, tol=1e-4, dtype="mixed_bfloat16")
    with pytest.warns(UserWarning, match=r"tol=0.0001 is below what its bfloat16 update resolves; .* 0.062"):
        assert layer.effective_tol == pytest.approx(8 * 2**-7)
    assert mmf.DEQFusion(8, tol=1e-4).effective_tol == 1e-4
    # The adjoint's relative stop is raised the same way; an absolute one is not.
    assert layer.effective_backward_tol == pytest.approx(8 * 2**-7)
    layer = mmf.DEQFusion(8, tol=1e-3, stop_mode="abs", backward_tol=1e-5, dtype="mixed_float16")
    assert layer.effective_tol == 1e-3 and layer.effective_backward_tol == pytest.approx(8 * 2**-10)
    layer = mmf.DEQFusion(8, backward_tol=1e-5, backward_stop_mode="abs", dtype="mixed_float16")
    assert layer.effective_backward_tol == 1e-5


def check_float32_outputs(model, fusion, policy, inputs):
    assert fusion.compute_dtype == policy.split("_")[1]
    assert model.output.dtype == "float32"
    assert model.predict(inputs, verbose=0).dtype == np.float32


# DEQFusion is checked the same way, after longer training, in the test below.
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", [n for n in NAMES if n != "deq"])
def test_every_fusion_layer_trains_with_float32_outputs(name, policy):
    (train_data, test_data) = data()
    model, fusion, history = train(name, ([a[:256] for a in train_data[0]], train_data[1][:256]), epochs=1)
    assert np.all(np.isfinite(history["loss"])), history
    check_float32_outputs(model, fusion, policy, [a[:8] for a in test_data[0]])


# Trained to the end of learning: after 5 epochs the three policies' held-out accuracies
# still differ by up to 2.25 points (float32 95.5%, float16 97.25%, bfloat16 95.0%), after
# 10 each classifies every held-out sample correctly.
TRAINED_EPOCHS = 10


@pytest.fixture(scope="module")
def float32_deq():
    """Accuracy and last-epoch solver logs of the DEQ classifier trained in float32."""
    train_data, test_data = data()
    model, _, history = train("deq", train_data, epochs=TRAINED_EPOCHS)
    accuracy = np.mean(model.predict(test_data[0], verbose=0).argmax(-1) == test_data[1])
    return accuracy, {k: v[-1] for k, v in history.items()}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_deq_under_mixed_precision_converges_and_keeps_float32_accuracy(policy, float32_deq):
    """Without the raised tolerance every solve ran to max_iter under these policies."""
    full, full_logs = float32_deq
    train_data, test_data = data()
    model, fusion, history = train("deq", train_data, epochs=TRAINED_EPOCHS)
    assert np.all(np.isfinite(history["loss"])), history
    check_float32_outputs(model, fusion, policy, [a[:8] for a in test_data[0]])
    assert fusion.last_stats["residual"].dtype == "float32"  # the solver state stays float32
    mixed = np.mean(model.predict(test_data[0], verbose=0).argmax(-1) == test_data[1])
    assert full > 0.8, full
    assert mixed >= full - 0.01, (mixed, full)
    assert history["deq_steps"][-1] < fusion.max_iter, history
    assert history["deq_converged"][-1] >= min(full_logs["deq_converged"], 0.95) - 0.05, (history, full_logs)
