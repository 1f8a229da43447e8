"""The project side of benchmarks/training_parity.py, on a tiny model whose steps are
checked against PyTorch's Adam computed by hand (clip, coupled decay, epsilon placement),
with each step's dropout masks drawn by hand."""

import dataclasses
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
try:
    import training_parity
finally:
    sys.path.remove(BENCHMARKS)

from keras_mmfusion.layers import deq_fusion as deq_module  # noqa: E402
from keras_mmfusion.training import REFERENCE_RECIPE, Splits, build_model  # noqa: E402

UNITS, WIDTH, BATCH, STEPS, PROBE_SEED, MASK_SEED, RATE = 8, 3, 6, 3, 5, 7, 0.5


def official_style_weights(rng):
    """Random weights under the official parameter names, plus inputs and labels; small
    GroupNorm gains make the DEQ update a contraction, so that the steps are smooth."""
    shapes = {}
    for v in range(3):
        shapes.update({f"FeatureInforEncoder.{v}.clf.0": (WIDTH, WIDTH), f"FeatureEncoder.{v}.clf.0": (UNITS, WIDTH),
                       f"TCPClassifierLayer.{v}.clf.0": (2, UNITS), f"TCPConfidenceLayer.{v}.clf.0": (1, UNITS)})
        for name in ("conv1", "conv2"):
            shapes[f"deq_fusion.func_.branches.{v}.{name}"] = (UNITS, UNITS)
    shapes.update({"MMClasifier.0.clf.0": (2, UNITS), "deq_fusion.func_.branches.3.gate": (UNITS, UNITS),
                   "deq_fusion.func_.branches.3.fuse": (UNITS, UNITS)})
    weights = {}
    for prefix, shape in shapes.items():
        weights[prefix + ".weight"] = rng.normal(size=shape) / np.sqrt(shape[1])
        weights[prefix + ".bias"] = 0.1 * rng.normal(size=shape[0])
    norms = [f"deq_fusion.func_.branches.{v}.gn{j}" for v in range(3) for j in (1, 2, 3)]
    for prefix in norms + ["deq_fusion.func_.branches.3.gn3"]:
        weights[prefix + ".weight"] = 0.2 + 0.02 * rng.normal(size=UNITS)
        weights[prefix + ".bias"] = 0.1 * rng.normal(size=UNITS)
    for v in range(3):
        weights[f"input_{v}"] = rng.uniform(size=(BATCH, WIDTH))
    weights["labels"] = np.arange(BATCH) % 2
    return weights


def settings():
    # A clipping norm the tiny model's gradients exceed, so that the clip acts; short solves.
    backward = dict(REFERENCE_RECIPE.fusion_options["backward"])
    backward["config"] = dict(backward["config"], max_iter=7)
    fusion = dict(REFERENCE_RECIPE.fusion_options, max_iter=6, backward=backward)
    recipe = dataclasses.replace(REFERENCE_RECIPE, units=UNITS, clipnorm=0.05, jit_compile=False,
                                 fusion_options=fusion)
    return training_parity.parity_settings(recipe, RATE)


def loss_and_gradients(model, xs, labels, loss_weight, variables):
    from keras_mmfusion.layers import training_labels

    with tf.GradientTape() as tape, training_labels(labels):
        p = model(xs, training=True)
        loss = loss_weight * tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, p))
        loss += tf.add_n(model.losses)
    return loss, tape.gradient(loss, variables)


def steps_by_hand(weights, recipe, clip="global", epsilon=1e-8, steps=STEPS, mask_seed=MASK_SEED):
    """The losses of ``steps`` full-batch steps: gradients from a tape, then PyTorch's Adam
    written out (global clip, coupled decay, epsilon on the bias-corrected sqrt(v)); the
    dropout layers multiply by each step's masks from ``default_rng([mask_seed, step])``."""
    xs = [weights[f"input_{v}"] for v in range(3)]
    labels = weights["labels"]
    model = build_model("reference", Splits((xs, labels), (xs, labels), 2, "toy"), recipe)
    training_parity.official_weights_into(model, weights)
    pairs = training_parity.paired_variables(model)
    state = {name: (np.zeros(variable.shape), np.zeros(variable.shape)) for variable, name, _ in pairs}
    masks = {}
    for v in range(3):
        model.get_layer(f"encoder_dropout_{v}").call = lambda h, training=False, v=v: h * masks[v] if training else h
    losses = []
    drawn = deq_module.gaussian_probes
    try:
        for step in range(steps):
            rng = np.random.default_rng([PROBE_SEED, step])
            probes = tf.constant(np.stack([rng.standard_normal((BATCH, 4 * UNITS)) for _ in range(2)]))
            deq_module.gaussian_probes = lambda z, n, seed=None: probes
            rng = np.random.default_rng([mask_seed, step])
            masks.update({v: tf.constant((rng.random((BATCH, UNITS)) >= RATE) / (1 - RATE)) for v in range(3)})
            loss, grads = loss_and_gradients(model, xs, labels, recipe.loss_weight, [v for v, _, _ in pairs])
            losses.append(float(loss))
            grads = [g.numpy() for g in grads]
            if clip == "global":
                norm = np.sqrt(sum(np.sum(g**2) for g in grads))
                grads = [g * recipe.clipnorm / max(norm, recipe.clipnorm) for g in grads]
            else:
                grads = [g * recipe.clipnorm / max(np.linalg.norm(g), recipe.clipnorm) for g in grads]
            t = step + 1
            for g, (variable, name, _) in zip(grads, pairs):
                w = variable.numpy()
                g = g + recipe.weight_decay * w
                m, v = state[name]
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
                state[name] = (m, v)
                variable.assign(w - recipe.lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + epsilon))
    finally:
        deq_module.gaussian_probes = drawn
    return losses


@pytest.fixture
def float64():
    policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy(policy)


def test_the_harness_steps_are_pytorch_adams_steps(float64):
    weights = official_style_weights(np.random.default_rng(0))
    recipe = settings()
    rows, _, _ = training_parity.keras_side(weights, recipe, STEPS, PROBE_SEED, "float64", MASK_SEED)
    ours = [row["total"] for row in rows]
    expected = steps_by_hand(weights, recipe)
    # Keras keeps the learning rate in float32: 1e-4 is off by a relative 2.5e-8.
    np.testing.assert_allclose(ours, expected, rtol=1e-7)
    # One changed detail moves the second step's loss by far more than that; other masks
    # move the first.
    for changed in (steps_by_hand(weights, recipe, epsilon=1e-3, steps=2),
                    steps_by_hand(weights, recipe, clip="per_variable", steps=2)):
        assert abs(changed[1] / expected[1] - 1) > 1e-5
    other_masks = steps_by_hand(weights, recipe, steps=1, mask_seed=MASK_SEED + 1)
    assert abs(other_masks[0] / expected[0] - 1) > 1e-5
    assert rows[0]["cross_entropy"] > 0 and rows[0]["jacobian"] > 0


def test_relative_differences_compare_every_term():
    ours = [{t: 1.0 for t in training_parity.TERMS}]
    theirs = [dict(ours[0], jacobian=2.0)]
    differences = training_parity.relative_differences(ours, theirs)
    assert differences["jacobian"] == [0.5] and differences["total"] == [0.0]
