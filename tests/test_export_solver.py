"""Exported equilibrium solves iterate as Keras's do: same steps, residual traces and flags.

Final outputs alone hide a solver that iterates differently, since each runtime returns
its best iterate. These tests compare the solver's own record across runtimes, on a
small map with a known fixed point and on a trained, standardised DEQ classifier built
as users build it (the layer's defaults, ``build_classifier`` with ``standardize_with``).
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion import export
from keras_mmfusion.equilibrium import fixed_point_solve
from keras_mmfusion.layer_statistics import report_solver_stats
from keras_mmfusion.training import build_before_tracing

from helpers import made_once, trained_once

SOLVERS = ["anderson", "broyden", "fixed_point"]
FORMATS = ["saved_model", "tflite", "onnx"]
WIDTHS = (6, 10, 8)


def exported(model, fmt, tmp_path):
    """``model`` exported with the solver diagnostics in format ``fmt``; returns the path."""
    if fmt == "saved_model":
        return export.to_saved_model(model, tmp_path / "serving", diagnostics=True)
    if fmt == "tflite":
        return export.to_tflite(model, tmp_path / "model.tflite", diagnostics=True)
    return export.to_onnx(model, tmp_path / "model.onnx", diagnostics=True)


def keras_outputs(model, xs):
    """The serving function run by TensorFlow: Keras's outputs and solver diagnostics."""
    serve = export.serving_function(model, diagnostics=True)
    return {k: v.numpy() for k, v in serve(*[tf.constant(x) for x in xs]).items()}


def assert_same_iteration(reference, got, layer, tol):
    """The exported solve took Keras's steps, residual trace and converged flags.

    Runtimes round differently in float32, so a sample whose residual lands within
    float error of ``tol`` can be counted converged one step apart. Step counts may
    differ by one only then: when the runtime that stopped first stopped with its
    largest residual within 5% of ``tol``. A solver that iterates differently takes
    several steps more (13 against 10 for the previous Anderson loop in TFLite).
    """
    steps, got_steps = int(reference[f"{layer}_steps"][0]), int(got[f"{layer}_steps"][0])
    if got_steps != steps:
        first = reference if steps < got_steps else got
        assert abs(got_steps - steps) == 1, (got_steps, steps)
        assert np.max(first[f"{layer}_residual"]) > 0.95 * tol, (got_steps, steps, first[f"{layer}_residual"])
    else:
        np.testing.assert_array_equal(got[f"{layer}_converged"], reference[f"{layer}_converged"])
    # The trace holds the batch-mean residual after every evaluation of the update. The
    # absolute floor, 1e-5 of the starting residual, is about 100 float32 roundings:
    # Anderson's least-squares weights amplify the runtimes' rounding differences.
    common = min(steps, got_steps)
    trace, want = got[f"{layer}_trace"], reference[f"{layer}_trace"]
    np.testing.assert_allclose(trace[:common], want[:common], rtol=1e-3, atol=1e-5 * want[0])
    assert not np.any(trace[got_steps:])


@keras.saving.register_keras_serializable(package="test_export_solver")
class TanhEquilibrium(keras.layers.Layer):
    """``z* = tanh(W z* + U x)`` with ``||W||_2 = 0.95``: a slow contraction on which
    plain iteration and the accelerated solvers take clearly different paths."""

    def __init__(self, solver, width=16, **kwargs):
        super().__init__(**kwargs)
        self.solver, self.width = solver, width
        rng = np.random.default_rng(0)
        w = rng.normal(size=(width, width))
        self.w = (0.95 * w / np.linalg.norm(w, 2)).astype("float32")
        self.u = rng.normal(size=(width, width)).astype("float32")

    def call(self, x):
        def f(z, x):
            return tf.tanh(z @ self.w + x @ self.u)

        z, stats = fixed_point_solve(f, x, tf.zeros_like(x), solver=self.solver, max_iter=60, tol=1e-6)
        report_solver_stats(self.name, stats)
        return z

    def get_config(self):
        return {**super().get_config(), "solver": self.solver, "width": self.width}


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_iterates_alike_in_every_runtime_on_a_known_fixed_point(solver, tmp_path):
    x = np.random.default_rng(1).normal(size=(4, 16)).astype("float32")
    layer = TanhEquilibrium(solver, name="solve")
    inputs = keras.Input((16,), name="x")
    model = keras.Model(inputs, keras.layers.Identity(name="z")(layer(inputs)))
    # The fixed point in float64, by plain iteration to convergence.
    z = np.zeros((4, 16))
    for _ in range(2000):
        z = np.tanh(z @ layer.w.astype("float64") + x @ layer.u.astype("float64"))
    reference = keras_outputs(model, [x])
    assert bool(np.all(reference["solve_converged"]))
    for fmt in ("tflite", "onnx"):
        got = export.run_export(exported(model, fmt, tmp_path), {"x": x})
        assert_same_iteration(reference, got, "solve", tol=1e-6)
        np.testing.assert_allclose(got["z"], z, atol=1e-5)


def deq_data():
    x, y = mmf.make_synthetic(1000, num_modalities=3, widths=list(WIDTHS), noise=0.3, seed=7)
    x = [a * 4.0 + 2.0 for a in x]  # offsets and scales for the standardisation to remove
    return ([a[:800] for a in x], y[:800]), [a[800:808] for a in x]


def train_deq():
    train, _ = deq_data()
    keras.utils.set_random_seed(0)
    model = mmf.models.build_classifier(mmf.models.make_fusion("deq", 8), WIDTHS, 2, encoder_units=8,
                                        head_units=8, standardize_with=train[0])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    build_before_tracing(model, *train)
    model.fit(*train, epochs=8, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained_deq(tmp_path_factory):
    """A DEQ classifier as users build it, trained briefly, saved and reloaded:
    ``{solver: model}`` and test inputs.

    One model is trained (Anderson, the default), once per test run for this module and
    ``test_export_quantized.py``; the Broyden and plain-iteration models carry its
    weights with the solver swapped.
    """
    model = trained_once(tmp_path_factory, "export_solver_deq", train_deq)
    models = {"anderson": model}
    for solver in SOLVERS[1:]:
        config = model.get_config()
        for layer in config["layers"]:
            if layer["class_name"] == "DEQFusion":
                layer["config"]["solver"] = solver
        models[solver] = keras.Model.from_config(config)
        models[solver].set_weights(model.get_weights())
    return models, deq_data()[1]


def anderson_tflite(model, tmp_path_factory):
    """The Anderson model ``model`` (``trained_deq``'s) as a TFLite file with diagnostics,
    converted once per test run for this module and ``test_export_quantized.py``."""
    return str(made_once(tmp_path_factory, "export_solver_deq_diagnostics.tflite",
                         lambda path: export.to_tflite(model, path, diagnostics=True)))


@pytest.fixture(scope="module")
def anderson_artefacts(trained_deq, tmp_path_factory):
    """The Anderson model exported with diagnostics once in every format: ``{format: path}``."""
    models, _ = trained_deq
    base = tmp_path_factory.mktemp("anderson")
    return {fmt: anderson_tflite(models["anderson"], tmp_path_factory) if fmt == "tflite"
            else exported(models["anderson"], fmt, base / fmt) for fmt in FORMATS}


@pytest.mark.parametrize("solver", SOLVERS)
def test_trained_classifier_iterates_alike_in_every_runtime(solver, trained_deq, anderson_artefacts, tmp_path):
    models, xs = trained_deq
    model = models[solver]
    reference = keras_outputs(model, xs)
    assert int(reference["deq_fusion_steps"][0]) > 2  # a solve, not a first-step exit
    feed = dict(zip(export.input_names(model), xs))
    # A SavedModel runs TensorFlow's kernels on the graph keras_outputs runs: one solver
    # checks that saving and reloading it keeps the loop; the other runtimes get every solver.
    for fmt in FORMATS if solver == "anderson" else [f for f in FORMATS if f != "saved_model"]:
        path = anderson_artefacts[fmt] if solver == "anderson" else exported(model, fmt, tmp_path / fmt)
        got = export.run_export(path, feed)
        assert_same_iteration(reference, got, "deq_fusion", tol=model.get_layer("deq_fusion").tol)
        np.testing.assert_allclose(got["probabilities"], reference["probabilities"], atol=1e-4)
        # The solver loop is the runtime's own loop op, built from builtin ops only.
        if fmt == "tflite":
            ops = export.tflite_report(path)["ops"]
            assert "WHILE" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
        if fmt == "onnx":
            import onnx

            assert "Loop" in {node.op_type for node in onnx.load(path).graph.node}


def with_bad_samples(xs):
    """The inputs with sample 0 holding a NaN, sample 1 an infinity and sample 2 a huge value."""
    bad = [np.array(a, copy=True) for a in xs]
    bad[0][0, 0] = np.nan
    bad[1][1, 2] = np.inf
    bad[2][2, 1] = 1e30
    return bad


def test_non_finite_and_overflowing_inputs_give_nan_and_not_converged(trained_deq, anderson_artefacts):
    models, xs = trained_deq
    model = models["anderson"]
    bad = with_bad_samples(xs)
    reference = keras_outputs(model, bad)
    keras_probabilities = model.predict(bad, verbose=0)
    feed = dict(zip(export.input_names(model), bad))
    runs = {"keras": reference}
    for fmt in FORMATS:
        runs[fmt] = export.run_export(anderson_artefacts[fmt], feed)
    for name, got in runs.items():
        probabilities, converged = got["probabilities"], got["deq_fusion_converged"]
        # Sample 2's 1e30 overflows the update's normalisation: no fixed point was found.
        assert np.all(np.isnan(probabilities[:3])), (name, probabilities[:3])
        assert not np.any(converged[:3]), (name, converged)
        assert np.all(np.isfinite(probabilities[3:])), name
        np.testing.assert_allclose(probabilities[3:], keras_probabilities[3:], atol=1e-4, err_msg=name)
    assert np.all(np.isnan(keras_probabilities[:3]))


def with_modality_mask(model):
    """The trained classifier ``model`` rebuilt with a ``modality_mask`` input, same weights."""
    keras.utils.set_random_seed(0)
    masked = mmf.models.build_classifier(mmf.models.make_fusion("deq", 8), WIDTHS, 2, encoder_units=8,
                                         head_units=8, standardize_with=[np.zeros((2, w)) for w in WIDTHS],
                                         modality_mask=True)
    masked.set_weights(model.get_weights())
    for layer in masked.layers:  # Normalization reads its statistics from adapt state
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
    return masked


def test_masked_classifier_iterates_alike_in_every_runtime_with_modalities_absent(trained_deq, tmp_path):
    """The trained classifier rebuilt with a ``modality_mask`` input: with every modality
    present it computes what the unmasked model computes, and with modalities absent
    (NaN placeholders) every runtime takes Keras's steps and gives Keras's output."""
    models, xs = trained_deq
    model = models["anderson"]
    masked = with_modality_mask(model)
    assert export.input_names(masked)[-1] == "modality_mask"
    full = np.ones((len(xs[0]), 3), bool)
    np.testing.assert_allclose(masked.predict(xs + [full], verbose=0), model.predict(xs, verbose=0), atol=1e-6)
    mask = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], bool)
    absent = [np.where(mask[:, i : i + 1], x, np.nan).astype("float32") for i, x in enumerate(xs)]
    reference = keras_outputs(masked, absent + [mask])
    assert np.all(np.isfinite(reference["probabilities"]))
    assert int(reference["deq_fusion_steps"][0]) > 2
    # The absent views change the answer: the mask is not ignored.
    assert np.max(np.abs(reference["probabilities"][1:7] - model.predict(xs, verbose=0)[1:7])) > 1e-3
    feed = dict(zip(export.input_names(masked), absent + [mask]))
    for fmt in FORMATS:
        got = export.run_export(exported(masked, fmt, tmp_path / fmt), feed)
        assert_same_iteration(reference, got, "deq_fusion", tol=masked.get_layer("deq_fusion").tol)
        np.testing.assert_allclose(got["probabilities"], reference["probabilities"], atol=1e-5, err_msg=fmt)
