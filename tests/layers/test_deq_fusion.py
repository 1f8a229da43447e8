import os

import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_mmfusion.equilibrium import hutchinson_jacobian_norm
from keras_mmfusion.layers import DEQFusion
from keras_mmfusion.training import build_before_tracing

from helpers import (BAD_FUSION_INPUTS, assert_weight_gradients_match_finite_differences, fit_and_score,
                     fusion_classifier, linear_classifier, random_inputs, synthetic_split)

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


def test_output_shape_projection_and_last_stats():
    layer = DEQFusion(units=16, max_iter=30)
    out = layer(random_inputs())
    assert tuple(out.shape) == (5, 16)
    # Widths 8 differ from units 16 and are projected; width 12 too.
    assert all(p is not None for p in layer.projections)
    stats = layer.last_stats
    assert set(stats) == {"steps", "residual", "converged", "backward_steps", "backward_residual",
                          "backward_converged"}
    assert 1 <= int(stats["steps"]) <= 30
    assert np.isfinite(float(stats["residual"]))
    assert bool(stats["converged"]) == (float(stats["residual"]) <= layer.tol)


def test_units_none_uses_the_common_width_without_projection():
    layer = DEQFusion(max_iter=5)
    out = layer(random_inputs(widths=(8, 8)))
    assert tuple(out.shape) == (5, 8)
    assert layer.projections == [None, None]
    with pytest.raises(ValueError, match=r"widths \[8, 12\] differ"):
        DEQFusion()(random_inputs(widths=(8, 12)))


def test_get_config_round_trips():
    layer = DEQFusion(
        units=12,
        solver="broyden",
        max_iter=7,
        tol=1e-3,
        stop_mode="abs",
        backward="phantom",
        backward_max_iter=9,
        backward_tol=1e-5,
        backward_stop_mode="abs",
        jacobian_weight=0.5,
        jacobian_probes=2,
        jacobian_frequency=0.25,
        num_groups=3,
        phantom_steps=4,
        phantom_damping=0.7,
        warmup_steps=30,
        warmup_depth=3,
        solver_options={"memory": 6},
        kernel_normalization="weight",
        seed=11,
        name="fuse",
    )
    config = layer.get_config()
    clone = DEQFusion.from_config(config)
    assert clone.get_config() == config
    for key, value in dict(units=12, solver="broyden", max_iter=7, backward="phantom", num_groups=3,
                           jacobian_frequency=0.25, kernel_normalization="weight", warmup_steps=30,
                           warmup_depth=3, backward_stop_mode="abs").items():
        assert config[key] == value
    # A config written without backward_stop_mode (an older .keras file) loads with the
    # adjoint's relative stop.
    del config["backward_stop_mode"]
    assert DEQFusion.from_config(config).backward_stop_mode == "rel"


def test_gradients_never_vanish_at_small_loss_scales_under_the_reference_recipes_solves():
    # The recipe's adjoint solve starts at zero, as the official code's does; its solver
    # never returns that start, so a loss scaled by 1e-4 or 1e-8 still gives every sample
    # a gradient. The reference Anderson's ridge is absolute, so that gradient is not
    # linear in the loss (at 1e-4 it is far from the unscaled one, as in the official
    # code); the default adjoint, started at the right-hand side and solved per sample
    # for a unit right-hand side, is linear with the same solver, up to rounding.
    from keras_mmfusion.training import REFERENCE_RECIPE

    options = dict(REFERENCE_RECIPE.fusion_options, max_iter=10, jacobian_weight=0.0)
    assert options["solver"] == "reference_anderson" and options["backward"]["config"]["start"] == "zero"
    inputs = [tf.constant(x) for x in random_inputs(batch=16, widths=(12, 12, 12), seed=3)]
    weights = tf.constant(np.random.default_rng(3).normal(size=(16, 16)), "float32")

    def gradients_at(layer):
        kernel = layer.modality_blocks[0].dense1.kernel

        @tf.function
        def scaled_gradients(scale):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = scale * tf.reduce_mean(tf.reduce_sum(layer(inputs) * weights, axis=-1))
            return [g / scale for g in tape.gradient(loss, inputs + [kernel])]

        return [scaled_gradients(tf.constant(s)) for s in (1.0, 1e-4, 1e-8)]

    def relative(a, b):
        return max(float(tf.norm(x - y) / tf.norm(x)) for x, y in zip(a, b))

    keras.utils.set_random_seed(3)
    recipe = DEQFusion(units=16, **options)
    recipe(inputs)
    at_one, *small = gradients_at(recipe)
    for grads in small:
        assert all(bool(tf.reduce_all(tf.reduce_any(g != 0, axis=-1))) for g in grads[:3])
    assert relative(at_one, small[0]) > 0.1  # 1.9 measured
    keras.utils.set_random_seed(3)
    default = DEQFusion(units=16, **{**options, "backward": "implicit", "backward_max_iter": 31})
    default(inputs)
    at_one, *small = gradients_at(default)
    # Up to float32 rounding, which the unconverged solves amplify (6e-4 measured).
    assert all(relative(at_one, grads) < 5e-3 for grads in small)


def test_last_stats_and_fit_logs_report_the_adjoint_solve(capsys):
    inputs = [tf.constant(x) for x in random_inputs(batch=8, widths=(8, 8))]
    # Not the plain sum of the output: GroupNorm makes it constant, and J^T v = 0.
    weights = tf.constant(np.random.default_rng(0).normal(size=(8, 8)), "float32")
    for capped in (True, False):
        kwargs = dict(backward_max_iter=2, backward_tol=1e-10) if capped else {}
        layer = DEQFusion(units=8, max_iter=30, jacobian_weight=0.0, **kwargs)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(inputs) * weights)
        tape.gradient(loss, layer.trainable_weights)
        stats = layer.last_stats
        residual = float(stats["backward_residual"])
        if capped:
            assert int(stats["backward_steps"]) == 2 and not bool(stats["backward_converged"])
            assert 1e-10 < residual < 1
        else:
            assert 2 < int(stats["backward_steps"]) <= 30 and bool(stats["backward_converged"])
            assert residual <= layer.tol
    # In fit, the adjoint's statistics are logged, and an unconverged one is in the progress bar.
    widths, (x, y), _ = synthetic_split(train=64, test=0)
    model = fusion_classifier(DEQFusion(max_iter=30, backward_max_iter=2, backward_tol=1e-10), widths)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    history = model.fit(x, y, epochs=1, batch_size=32, verbose=2).history
    assert history["deq_backward_steps"] == [2.0]
    assert history["deq_backward_converged"] == [0.0]
    assert history["deq_backward_residual"][0] > 1e-10
    assert "deq_backward_converged: 0.0000" in capsys.readouterr().out


def numpy_group_norm(x, norm, groups):
    batch, width = x.shape
    grouped = x.reshape(batch, groups, width // groups)
    centred = grouped - grouped.mean(-1, keepdims=True)
    normed = (centred / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5)).reshape(batch, width)
    return normed * norm.gamma.numpy() + norm.beta.numpy()


def numpy_dense(x, dense):
    return x @ dense.kernel.numpy() + dense.bias.numpy()


def test_update_follows_the_reference_formulation():
    # One update computed independently in NumPy: per modality
    # GN3(relu(GN2(W2 relu(GN1(W1 z_i)) + x_i) + z_i)); for the fused state
    # GN(relu(W_f sum_i z_f * W_g(z_i' + z_f) + sum_i w_i x_i + b)).
    rng = np.random.default_rng(0)
    inputs = random_inputs(batch=3, widths=(8, 8), dtype="float64")
    layer = DEQFusion(units=8, num_groups=2, dtype="float64", kernel_initializer="glorot_uniform")
    layer.build([tuple(np.shape(x)) for x in inputs])
    for weight in layer.weights:  # move every weight off its initial value
        weight.assign(weight.numpy() + 0.3 * rng.normal(size=weight.shape))
    z = rng.normal(size=(3, 24))
    states = np.split(z, 3, axis=-1)
    updated = []
    for block, z_i, x_i in zip(layer.modality_blocks, states[:2], inputs):
        h = np.maximum(numpy_group_norm(numpy_dense(z_i, block.dense1), block.norm1, 2), 0)
        h = numpy_group_norm(numpy_dense(h, block.dense2) + x_i, block.norm2, 2)
        updated.append(numpy_group_norm(np.maximum(h + z_i, 0), block.norm3, 2))
    fuse = layer.fusion_block
    z_f = states[2]
    purified = sum(z_f * numpy_dense(u + z_f, fuse.gate) for u in updated)
    weights, bias = layer.injection_weights.numpy(), layer.injection_bias.numpy()
    x_fuse = sum(w * x for w, x in zip(weights, inputs)) + bias
    fused = numpy_group_norm(np.maximum(numpy_dense(purified, fuse.combine) + x_fuse, 0), fuse.norm, 2)
    (xs, x_fuse_layer), _ = layer._injections([tf.constant(x) for x in inputs])
    np.testing.assert_allclose(x_fuse_layer.numpy(), x_fuse, rtol=1e-12)
    expected = np.concatenate(updated + [fused], axis=-1)
    np.testing.assert_allclose(layer._equilibrium_map(tf.constant(z), (xs, x_fuse_layer)).numpy(), expected,
                               rtol=1e-9, atol=1e-12)


def contractive_layer(inputs, seed=3, **kwargs):
    """A built float64 DEQFusion whose update is a contraction.

    GroupNorm divides by the spread of its input, so small weights alone do not make
    the update contract; scaling the GroupNorm gains down does, which plain iteration
    (the unrolled reference) needs in order to converge.
    """
    keras.utils.set_random_seed(seed)
    layer = DEQFusion(dtype="float64", kernel_initializer=keras.initializers.RandomNormal(stddev=0.3), **kwargs)
    # Built without a call: an eager solve of the update before its gains are scaled runs
    # its whole budget, one Python iteration at a time.
    layer.build([tuple(x.shape) for x in inputs])
    for weight in layer.trainable_weights:
        if weight.path.endswith("gamma"):
            weight.assign(0.1 * weight.numpy())
    return layer


def weighted_output(layer, inputs):
    out = layer(inputs)
    return tf.reduce_sum(tf.sin(out) * tf.range(1.0, out.shape[-1] + 1.0, dtype=out.dtype))


def traced_gradients(layer, inputs):
    """The gradient of ``weighted_output`` with respect to the inputs and the layer's
    weights, in one traced function (an eager solve of 150 steps takes seconds)."""

    @tf.function
    def run(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            value = weighted_output(layer, inputs)
        return tape.gradient(value, inputs + layer.trainable_weights)

    return run(inputs)


def test_layer_implicit_gradients_match_unrolled_in_float64():
    inputs = [tf.constant(x) for x in random_inputs(batch=4, widths=(8, 8), dtype="float64")]
    grads = {}
    for backward in ("implicit", "unrolled"):
        layer = contractive_layer(inputs, units=8, max_iter=170, tol=1e-13, backward=backward)
        grads[backward] = traced_gradients(layer, inputs)
        assert float(layer.last_stats["residual"]) < 1e-11, backward
    names = ["x0", "x1"] + [w.path for w in layer.trainable_weights]
    for name, a, b in zip(names, grads["implicit"], grads["unrolled"]):
        # The injection bias's true gradient is zero (GroupNorm removes a constant
        # shift), hence the small absolute tolerance next to the relative one.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-10, err_msg=name)
    assert float(tf.norm(grads["implicit"][0])) > 1e-3  # not a comparison of zeros


@pytest.mark.parametrize("kernel_normalization", [None, "weight"])
def test_layer_gradients_match_finite_differences_along_random_directions(kernel_normalization):
    inputs = [tf.constant(x) for x in random_inputs(batch=3, widths=(8, 8), dtype="float64")]
    layer = contractive_layer(inputs, seed=5, units=8, max_iter=150, tol=1e-13,
                              kernel_normalization=kernel_normalization)
    if kernel_normalization:  # the implicit gradient reaches the lengths and the directions
        assert sum(w.path.endswith("scale") for w in layer.trainable_weights) == 6
    params = inputs + [tf.constant(w.numpy()) for w in layer.trainable_weights]
    grads = traced_gradients(layer, inputs)
    output = tf.function(lambda xs: weighted_output(layer, xs))
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):
        directions = [rng.normal(size=p.shape) for p in params]
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, directions))

        def shifted(sign):
            for w, p, d in zip(layer.trainable_weights, params[2:], directions[2:]):
                w.assign(p + sign * eps * d)
            shifted_inputs = [x + sign * eps * d for x, d in zip(inputs, directions[:2])]
            result = float(output(shifted_inputs))
            for w, p in zip(layer.trainable_weights, params[2:]):
                w.assign(p)
            return result

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("kernel_normalization", [None, "weight"])
def test_jacobian_penalty_gradient_matches_finite_differences_for_every_weight(kernel_normalization):
    # The penalty differentiates a vector-Jacobian product of the update, so its
    # gradient needs exact second derivatives of every op in it, GroupNorm and the
    # kernels' weight normalisation included.
    rng = np.random.default_rng(7)
    inputs = [tf.constant(x) for x in random_inputs(batch=3, widths=(8, 12), dtype="float64")]
    layer = DEQFusion(units=8, num_groups=2, dtype="float64", kernel_initializer="glorot_uniform",
                      kernel_normalization=kernel_normalization)
    layer.build([tuple(np.shape(x)) for x in inputs])
    for weight in layer.trainable_weights:  # off the initial values, where GroupNorm gains are all 1
        weight.assign(weight.numpy() + 0.3 * rng.normal(size=weight.shape))
    z = tf.constant(rng.normal(size=(3, 24)))
    probes = tf.constant(rng.normal(size=(2, 3, 24)))

    def penalty():
        x, _ = layer._injections(inputs)
        return hutchinson_jacobian_norm(lambda s: layer._equilibrium_map(s, x), z, probes=probes)

    with tf.GradientTape() as tape:
        value = penalty()
    assert value.dtype == tf.float64
    grads = tape.gradient(value, layer.trainable_weights)
    # The fused state's last GroupNorm shift adds a constant: no gradient, exactly. The
    # finite differences evaluate the penalty as one graph (assigning weights does not
    # retrace it); the gradient above is the eager tape's.
    assert_weight_gradients_match_finite_differences(tf.function(penalty), layer.trainable_weights, grads, rng,
                                                     h=1e-5, rtol=1e-5, atol=1e-9)


def test_float64_layer_keeps_its_jacobian_penalty_in_float64():
    inputs = random_inputs(batch=4, widths=(8, 8), dtype="float64")
    layer = DEQFusion(units=8, max_iter=5, jacobian_weight=2.0, dtype="float64", seed=1)
    layer(inputs, training=True)
    assert layer.losses[0].dtype == tf.float64


def test_default_initialisation_starts_near_a_contraction():
    # Glorot-scaled kernels leave every one of these draws at a relative residual of
    # about 0.1 after 60 Anderson steps; the default small kernels let most draws
    # converge outright and keep the rest an order of magnitude closer.
    medians, converged_draws = [], 0
    for seed in range(6):
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        inputs = [np.maximum(rng.normal(size=(128, 32)), 0).astype("float32") for _ in range(3)]
        layer = DEQFusion(units=32, max_iter=60, tol=1e-4)
        _, stats = layer.solve(inputs)  # per-sample residuals, not only the batch's largest
        assert stats.residual.shape == (128,)
        medians.append(float(np.median(stats.residual)))
        converged_draws += bool(np.all(stats.converged))
    assert converged_draws >= 3, medians
    assert max(medians) < 0.05, medians


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_split()


@pytest.fixture(scope="module")
def linear_accuracy(synthetic):
    _, train, test = synthetic
    keras.utils.set_random_seed(0)
    return fit_and_score(linear_classifier(synthetic[0]), train, test, epochs=15, lr=1e-2)


def test_fit_beats_linear_model_and_logs_solver_stats(synthetic, linear_accuracy):
    widths, (x, y), (xt, yt) = synthetic
    keras.utils.set_random_seed(1)
    # Every argument at its default. XLA-compiled training is checked against this
    # graph-mode training in tests/test_benchmarks.py (gpu_check), eager training below.
    model = fusion_classifier(DEQFusion(), widths)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    build_before_tracing(model, x, y)
    # 15 epochs: this seed's test accuracy is past 0.9 from the 9th epoch on (0.96 at
    # the 15th), and the linear model's stays below 0.62.
    history = model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    assert {"deq_steps", "deq_residual", "deq_converged", "deq_backward_steps", "deq_backward_residual",
            "deq_backward_converged"} <= set(history.history)
    assert all(1 <= s <= 50 for s in history.history["deq_steps"])
    # The defaults keep training at an equilibrium: the solves of (almost) every
    # training sample meet the tolerance, to the end of training.
    assert min(history.history["deq_converged"][-5:]) >= 0.99, history.history["deq_converged"]
    accuracy = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    assert linear_accuracy < 0.62
    assert accuracy > linear_accuracy + 0.12, (accuracy, linear_accuracy)


def test_eager_fit_takes_the_graph_fits_steps(synthetic):
    """``run_eagerly=True`` runs the solver loop in Python; with the same seed it trains
    exactly as the compiled graph does (Jacobian penalty included)."""
    widths, (x, y), _ = synthetic
    histories = {}
    for eager in (True, False):
        keras.utils.set_random_seed(1)
        model = fusion_classifier(DEQFusion(max_iter=15), widths)
        model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", run_eagerly=eager)
        build_before_tracing(model, x, y)
        histories[eager] = model.fit([a[:400] for a in x], y[:400], epochs=2, batch_size=200, shuffle=False,
                                     verbose=0).history
    eager, graph = histories[True], histories[False]
    assert eager["deq_steps"] == graph["deq_steps"] and all(1 < s <= 15 for s in eager["deq_steps"])
    assert eager["deq_converged"] == graph["deq_converged"]
    np.testing.assert_allclose(eager["loss"], graph["loss"], rtol=1e-5)
    # Residuals near tol=1e-4 are differences of O(1) numbers: float32 rounding, not more.
    np.testing.assert_allclose(eager["deq_residual"], graph["deq_residual"], rtol=0, atol=1e-6)
    assert eager["loss"][1] < eager["loss"][0]


def test_keras_save_and_load_in_safe_mode_with_a_warmup_that_counts_training_calls(tmp_path):
    widths = (8, 12)
    x = random_inputs(batch=64, widths=widths)
    y = np.arange(64) % 2
    # The penalty during a warm-up is checked in tests/equilibrium/test_gradients.py.
    layer = DEQFusion(units=8, max_iter=15, jacobian_weight=0, warmup_steps=3, warmup_depth=2)
    model = fusion_classifier(layer, widths)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, x, y)
    steps = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: steps.append(int(layer.last_stats["steps"]))
    )
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0, callbacks=[record])
    # Four training calls: three of two plain iterations, then a solve.
    assert steps[:3] == [2] * 3 and steps[3] > 2, steps
    # Inference calls (eager here, which traces nothing) neither warm up nor count.
    predictions = model(x)
    assert int(layer.last_stats["steps"]) > 2 and int(layer.training_calls.numpy()) == 4
    model.save(tmp_path / "deq.keras")
    loaded = keras.saving.load_model(tmp_path / "deq.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(x), predictions)
    reloaded = [l for l in loaded.layers if isinstance(l, DEQFusion)][0]
    assert reloaded.get_config()["warmup_steps"] == 3
    # The count decides the warm-up, so a reloaded model trains on without one.
    assert int(reloaded.training_calls.numpy()) == 4


def test_sequential_subclass_and_subclassed_model():
    x = random_inputs(batch=6, widths=(8, 8))
    y = np.arange(6) % 2

    class SequentialClassifier(keras.Sequential):
        pass

    class SubclassedClassifier(keras.Model):
        def __init__(self):
            super().__init__()
            self.fusion = DEQFusion(units=8, max_iter=6)
            self.head = keras.layers.Dense(2, activation="softmax")

        def call(self, inputs):
            return self.head(self.fusion(inputs))

    for model in (
        SequentialClassifier([DEQFusion(units=8, max_iter=6), keras.layers.Dense(2, activation="softmax")]),
        SubclassedClassifier(),
    ):
        model.compile("adam", "sparse_categorical_crossentropy")
        build_before_tracing(model, x, y)
        history = model.fit(x, y, epochs=2, verbose=0)
        assert "deq_steps" in history.history
        assert model.predict(x, verbose=0).shape == (6, 2)


def test_jacobian_penalty_is_added_in_training_only():
    x = random_inputs(batch=4, widths=(8, 8))
    layer = DEQFusion(units=8, max_iter=5, jacobian_weight=2.0, seed=1)
    layer(x, training=False)
    assert layer.losses == []
    layer(x, training=True)
    assert len(layer.losses) == 1 and float(layer.losses[0]) > 0
    plain = DEQFusion(units=8, max_iter=5, jacobian_weight=0.0)
    plain(x, training=True)
    assert plain.losses == []
    assert DEQFusion().jacobian_weight > 0  # on by default: it keeps training at an equilibrium


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jacobian_probes_are_philox_draws_from_the_layers_seed(jit_compile):
    # The layer draws its probes with Philox from its seed generator, and the penalty is
    # the Hutchinson estimate with exactly those probes.
    inputs = [tf.constant(x) for x in random_inputs(batch=4, widths=(8, 8))]
    layer = DEQFusion(units=8, max_iter=40, tol=1e-6, jacobian_weight=2.0, jacobian_probes=2, seed=5)
    layer(inputs)
    penalty = tf.function(lambda: layer(inputs, training=True) * 0 + layer.losses[0], jit_compile=jit_compile)()
    # XLA's Philox stream differs from TensorFlow's kernel's: draw in the same mode.
    seed = keras.random.SeedGenerator(5).next()
    probes = tf.function(lambda: tf.random.stateless_normal((2, 4, 24), seed=tf.cast(seed, tf.int64), alg="philox"),
                         jit_compile=jit_compile)()
    (xs, x_fuse), z0 = layer._injections(inputs)
    z, _ = layer._solve_state((xs, x_fuse), z0)
    expected = 2.0 * hutchinson_jacobian_norm(lambda s: layer._equilibrium_map(s, (xs, x_fuse)), z, probes=probes)
    np.testing.assert_allclose(float(penalty[0, 0]), float(expected), rtol=1e-4)
    # The automatically chosen algorithm gives the same numbers more slowly under XLA, so
    # the draw's algorithm input is checked in the traced graph: Philox is 1.
    graph = tf.function(lambda: layer(inputs, training=True)).get_concrete_function().graph
    draws = [op for op in graph.get_operations() if op.type == "StatelessRandomNormalV2"]
    assert len(draws) == 1
    assert int(tf.get_static_value(draws[0].inputs[3])) == 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_jacobian_frequency_applies_the_penalty_on_that_share_of_training_calls(jit_compile):
    x = random_inputs(batch=4, widths=(8, 8))
    layer = DEQFusion(units=8, max_iter=5, jacobian_weight=2.0, jacobian_frequency=0.3, seed=1)

    @tf.function(jit_compile=jit_compile)
    def step(inputs):
        # The penalty and its gradient, as a training step takes them.
        with tf.GradientTape() as tape:
            layer(inputs, training=True)
            penalty = layer.losses[0]
        return penalty, tape.gradient(penalty, layer.trainable_weights)

    layer(x)
    kernel = layer.modality_blocks[0].dense1.kernel
    index = [w.path for w in layer.trainable_weights].index(kernel.path)
    steps = [step(x) for _ in range(60)]
    penalties = np.array([float(p) for p, _ in steps])
    # Binomial(60, 0.3): mean 18, standard deviation 3.5.
    assert 8 <= np.count_nonzero(penalties) <= 28, penalties
    assert np.all(penalties[penalties != 0] > 0)
    # The penalty's gradient reaches the update's kernels on exactly the calls that apply it.
    kernel_grads = np.array([float(tf.norm(grads[index])) for _, grads in steps])
    np.testing.assert_array_equal(kernel_grads > 0, penalties > 0)


def test_mixed_precision_runs_with_float32_solver_state():
    keras.config.set_dtype_policy("mixed_float16")
    layer = DEQFusion(units=8, max_iter=10)
    out = layer(random_inputs(batch=4, widths=(8, 8)))
    assert out.dtype == tf.float16
    assert np.isfinite(out.numpy()).all()
    assert layer.last_stats["residual"].dtype == tf.float32


@pytest.mark.parametrize("inputs, message", BAD_FUSION_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_problem(inputs, message):
    with pytest.raises(ValueError, match=message):
        DEQFusion(units=8)(inputs)


def test_width_not_divisible_by_groups_raises_at_build():
    with pytest.raises(ValueError, match=r"state width 10 \(units\) must be divisible by num_groups=4"):
        DEQFusion(units=10, num_groups=4)(random_inputs(widths=(8, 8)))
    with pytest.raises(ValueError, match=r"state width 6 \(the common input width\)"):
        DEQFusion(num_groups=4)(random_inputs(widths=(6, 6)))


def test_built_layer_rejects_inputs_of_another_shape():
    layer = DEQFusion(units=8, max_iter=3)
    layer(random_inputs(widths=(8, 8)))
    with pytest.raises(ValueError, match=r"input 1 must have shape \(batch, 8\)"):
        layer(random_inputs(widths=(8, 5)))
    with pytest.raises(ValueError, match="built for 2 modalities and called on 3"):
        layer(random_inputs(widths=(8, 8, 8)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="newton"), "solver must be one of"),
        (dict(backward="adjoint"), "backward must be one of"),
        (dict(units=0), "units must be None or a positive integer"),
        (dict(max_iter=0), "max_iter"),
        (dict(jacobian_weight=-1.0), "jacobian_weight"),
        (dict(num_groups=0), "num_groups"),
        (dict(jacobian_frequency=0.0), r"jacobian_frequency must be in \(0, 1\]"),
        (dict(jacobian_frequency=1.5), "jacobian_frequency"),
        (dict(kernel_normalization="spectral"), r"kernel_normalization must be one of \(None, 'weight'\), got 'spectral'"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
        (dict(warmup_depth=0), "warmup_depth must be an integer >= 1"),
        (dict(warmup_steps=5, backward="unrolled"), r"warm-up \(warmup_steps > 0\) needs backward='implicit'"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DEQFusion(**kwargs)


def test_kernel_regularizer_adds_its_penalty_and_a_constraint_holds_after_a_step():
    inputs = [keras.Input((6,)), keras.Input((8,))]
    layer = DEQFusion(units=8, kernel_regularizer=keras.regularizers.L2(0.5), jacobian_weight=0.0,
                      kernel_constraint=keras.constraints.MaxNorm(0.05), bias_constraint=keras.constraints.NonNeg())
    model = keras.Model(inputs, keras.layers.Dense(2)(layer(inputs)))
    kernels = [w for w in layer.trainable_weights if w.path.endswith("kernel")]
    # The width-6 input's projection and the update's 2 + 2 + 2 Dense layers.
    assert len(kernels) == 7
    expected = sum(0.5 * float(tf.reduce_sum(tf.square(k))) for k in kernels)
    data = [np.random.default_rng(0).normal(size=(16, w)).astype("float32") for w in (6, 8)]
    model(data)
    assert len(model.losses) == len(kernels)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
    model.compile("sgd", "mse")
    model.fit(data, np.ones((16, 2)), epochs=1, batch_size=16, verbose=0)
    for kernel in kernels:
        assert float(tf.reduce_max(tf.norm(kernel, axis=0))) <= 0.05 + 1e-6, kernel.path
    biases = [w for w in layer.trainable_weights if w.path.endswith("bias") and "injection" not in w.path]
    assert biases and all(float(tf.reduce_min(b)) >= 0 for b in biases)


def test_a_deq_fusion_file_written_before_the_fusion_base_loads_and_predicts_the_same():
    # tests/data/deq_fusion_v1.keras and its predictions were written by the layer as it
    # was before it derived from FusionLayer.
    data = np.load(os.path.join(DATA, "deq_fusion_v1.npz"))
    model = keras.saving.load_model(os.path.join(DATA, "deq_fusion_v1.keras"), safe_mode=True)
    np.testing.assert_allclose(model.predict([data["a"], data["b"]], verbose=0), data["expected"], rtol=1e-5, atol=1e-6)
    layer = model.get_layer("deq")
    assert isinstance(layer, DEQFusion) and layer.backward == "implicit" and layer.kernel_constraint is None


def test_an_adjoint_object_as_backward_round_trips_through_a_keras_file(tmp_path):
    from keras_mmfusion.equilibrium import ImplicitAdjoint, PhantomAdjoint

    adjoint = ImplicitAdjoint(solver="fixed_point", max_iter=40, tol=1e-5, stop_mode="abs")
    inputs = [keras.Input((4,)), keras.Input((4,))]
    layer = DEQFusion(units=4, backward=adjoint, name="deq")
    model = keras.Model(inputs, layer(inputs))
    assert layer.adjoint is adjoint and layer.stats_metric.backward
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True).get_layer("deq")
    assert loaded.adjoint == adjoint
    assert DEQFusion(backward=PhantomAdjoint(2, 0.5)).adjoint == PhantomAdjoint(2, 0.5)
    with pytest.raises(ValueError, match="backward_\\* and phantom_\\* arguments"):
        DEQFusion(backward=adjoint, backward_tol=1e-3)


def test_the_sum_injection_has_no_parameters_and_is_the_plain_sum():
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(3, 8)) for _ in range(3)]
    layer = DEQFusion(units=8, num_groups=2, dtype="float64", injection="sum", jacobian_weight=0)
    layer.build([tuple(np.shape(x)) for x in inputs])
    assert not [w for w in layer.weights if "injection" in w.path]
    (_, x_fuse), _ = layer._injections([tf.constant(x) for x in inputs])
    np.testing.assert_allclose(x_fuse.numpy(), sum(inputs), rtol=1e-14)
    # Under a mask, absent modalities are left out of the sum.
    presence = tf.constant([[1.0, 0.0, 1.0]] * 3, tf.float64)
    (_, x_fuse, _), _ = layer._injections([tf.constant(x) for x in inputs], presence)
    np.testing.assert_allclose(x_fuse.numpy(), inputs[0] + inputs[2], rtol=1e-14)
    assert DEQFusion.from_config(layer.get_config()).injection == "sum"
    with pytest.raises(ValueError, match="injection"):
        DEQFusion(injection="weights")


def test_fit_logs_the_unweighted_jacobian_penalty():
    rng = np.random.default_rng(6)
    x = [rng.normal(size=(16, 4)).astype("float32") for _ in range(2)]
    inputs = [keras.Input((4,)) for _ in range(2)]
    fused = DEQFusion(units=4, jacobian_weight=3.0, max_iter=5, seed=1, name="fusion")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(fused))
    model.compile(keras.optimizers.SGD(0.0), "mse")  # no step: predict sees the weights fit saw
    logs = model.fit(x, np.zeros((16, 1)), batch_size=16, epochs=1, verbose=0).history
    penalty = logs["fusion_jacobian"][0]
    assert penalty > 0
    # The logged loss is the mse plus 3 times the logged penalty.
    mse = float(np.mean(np.square(model.predict(x, verbose=0))))
    assert logs["loss"][0] == pytest.approx(mse + 3.0 * penalty, rel=1e-5)
