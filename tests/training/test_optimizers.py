"""CoupledDecayAdam against Adam steps computed by hand in float64 (PyTorch's order:
clip the gradients, add the coupled decay, then Adam)."""

import keras
import numpy as np
import pytest

from keras_mmfusion.training import CoupledDecayAdam, compile_classifier

# A learning rate and betas exact in float32, in which Keras keeps some of them.
LR, DECAY, CLIP, EPS, B1, B2 = 2.0**-7, 0.05, 1.0, 1e-8, 1 - 2.0**-3, 1 - 2.0**-10
WEIGHTS = [np.array([0.5, -1.0, 2.0]), np.array([[0.3, -0.2], [1.5, 0.7]])]
# A global norm above the clip, one variable's norm below it, and entries small enough
# for the epsilon's placement to matter.
GRADIENTS = [np.array([3.0, -4.0, 1e-9]), np.array([[0.2, -3e-9], [0.1, 0.05]])]


def by_hand(steps, clip="global", decay="outside", torch_epsilon=True):
    ws = [w.copy() for w in WEIGHTS]
    ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
    for t in range(1, steps + 1):
        gs = [g.copy() for g in GRADIENTS]
        if decay == "inside":
            gs = [g + DECAY * w for g, w in zip(gs, ws)]
        if clip == "global":
            norm = np.sqrt(sum(np.sum(g**2) for g in gs))
            gs = [g * CLIP / max(norm, CLIP) for g in gs]
        else:
            gs = [g * CLIP / max(np.linalg.norm(g), CLIP) for g in gs]
        if decay == "outside":
            gs = [g + DECAY * w for g, w in zip(gs, ws)]
        for i, g in enumerate(gs):
            ms[i] = B1 * ms[i] + (1 - B1) * g
            vs[i] = B2 * vs[i] + (1 - B2) * g**2
            if torch_epsilon:
                ws[i] = ws[i] - LR * (ms[i] / (1 - B1**t)) / (np.sqrt(vs[i] / (1 - B2**t)) + EPS)
            else:
                ws[i] = ws[i] - LR * np.sqrt(1 - B2**t) / (1 - B1**t) * ms[i] / (np.sqrt(vs[i]) + EPS)
    return ws


def by_optimizer(steps, **options):
    variables = [keras.Variable(w, dtype="float64") for w in WEIGHTS]
    optimizer = CoupledDecayAdam(LR, coupled_weight_decay=DECAY, epsilon=EPS, beta_1=B1, beta_2=B2, **options)
    for _ in range(steps):
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in GRADIENTS], variables))
    return [np.asarray(v.numpy()) for v in variables]


def _close(a, b):
    return all(np.allclose(x, y, rtol=1e-12, atol=1e-15) for x, y in zip(a, b))


@pytest.mark.parametrize("torch_epsilon", [True, False])
def test_global_clipping_then_coupled_decay(torch_epsilon):
    ours = by_optimizer(3, global_clipnorm=CLIP, torch_epsilon=torch_epsilon)
    assert _close(ours, by_hand(3, torch_epsilon=torch_epsilon))
    # The hand computation tells the details apart: decay inside the clip, clipping
    # per variable and the other epsilon placement each give other weights.
    assert not _close(ours, by_hand(3, decay="inside", torch_epsilon=torch_epsilon))
    assert not _close(ours, by_hand(3, clip="per_variable", torch_epsilon=torch_epsilon))
    assert not _close(ours, by_hand(3, torch_epsilon=not torch_epsilon))


def test_per_variable_clipping_then_coupled_decay():
    ours = by_optimizer(2, clipnorm=CLIP, torch_epsilon=True)
    assert _close(ours, by_hand(2, clip="per_variable"))
    assert not _close(ours, by_hand(2, clip="global"))


def test_config_round_trip_and_compile_classifier_options():
    optimizer = CoupledDecayAdam(1e-3, coupled_weight_decay=0.1, torch_epsilon=True, epsilon=1e-8)
    revived = CoupledDecayAdam.from_config(optimizer.get_config())
    assert (revived.coupled_weight_decay, revived.torch_epsilon, revived.epsilon) == (0.1, True, 1e-8)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    compile_classifier(model, weight_decay=0.1, clipnorm=3.0, epsilon=1e-8, torch_epsilon=True)
    assert isinstance(model.optimizer, CoupledDecayAdam)
    assert (model.optimizer.coupled_weight_decay, model.optimizer.global_clipnorm) == (0.1, 3.0)
    with pytest.raises(ValueError, match="weight_decay"):
        compile_classifier(model, weight_decay=-1.0)
