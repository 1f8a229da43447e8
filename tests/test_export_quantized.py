"""Quantised exports of a trained DEQ classifier keep its solver in float, and the
``export/README.md`` snippets run as written on it.

The trained model is the fixture of ``test_export_solver.py``, trained once per test run
for both files; these tests live in their own file so that the test workers run them
alongside that file's.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_mmfusion as mmf
from keras_mmfusion import export
from test_export_solver import WIDTHS, anderson_tflite, trained_deq, with_modality_mask  # noqa: F401 - trained_deq is a fixture


@pytest.fixture(scope="module")
def deq_held_out():
    """The trained DEQ classifier's held-out samples (the 200 after its training data)."""
    x, y = mmf.make_synthetic(1000, num_modalities=3, widths=list(WIDTHS), noise=0.3, seed=7)
    return [a[800:] * 4.0 + 2.0 for a in x], y[800:]


def quantized_compute_in_solver_loop(path):
    """``(op, tensor)`` names of the quantised computation in the subgraphs run by the file's
    WHILE ops: QUANTIZE ops, and FULLY_CONNECTED ops that read a non-float input or weight
    (int8 activations, or int8 weights used as such: dynamic range). An op that only reads
    weights through a DEQUANTIZE computes in float32."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in flat.operatorCodes]
    loops = set()
    for graph in flat.subgraphs:
        for op in graph.operators:
            if codes[op.opcodeIndex] == schema.BuiltinOperator.WHILE:
                loops |= {op.builtinOptions.condSubgraphIndex, op.builtinOptions.bodySubgraphIndex}
    assert loops
    found, products = [], 0
    for index in loops:
        tensors = flat.subgraphs[index].tensors
        for op in flat.subgraphs[index].operators:
            code = codes[op.opcodeIndex]
            if code == schema.BuiltinOperator.QUANTIZE:
                found.append(("QUANTIZE", tensors[op.outputs[0]].name.decode()))
            elif code == schema.BuiltinOperator.FULLY_CONNECTED:
                products += 1
                for i in op.inputs[:2]:
                    if tensors[i].type != schema.TensorType.FLOAT32:
                        found.append(("FULLY_CONNECTED", tensors[i].name.decode()))
    assert products, "no matrix product inside the solver loop"
    return found


@pytest.fixture(scope="module")
def held_out_reference(trained_deq, deq_held_out):
    """The first 64 held-out samples and Keras's outputs and solver diagnostics for each, run
    one at a time (a solve's step count depends on its batch)."""
    serve = export.serving_function(trained_deq[0]["anderson"], diagnostics=True)
    xs = [a[:64] for a in deq_held_out[0]]
    return xs, [{k: v.numpy() for k, v in serve(*[tf.constant(a[i : i + 1]) for a in xs]).items()} for i in range(64)]


@pytest.mark.parametrize("quantize", ["float16", "dynamic", "int8"])
def test_quantized_solver_stays_float_and_takes_kerass_steps(quantize, trained_deq, deq_held_out, held_out_reference,
                                                             tmp_path):
    """Quantising the update's activations would floor the residual above tol (every solve
    then runs to max_iter); only its weights are quantised, so the solve still converges,
    in about Keras's number of steps, and the predictions stay Keras's.

    This briefly trained model's probabilities stay near 0.5, so the predictions are a
    sensitive check: with int8 ranges averaged over the calibration samples instead of
    their minimum and maximum, int8 changed 9% of them. int8 accuracy is checked on
    models that have learned: for the other layers in test_export.py, for a DEQ
    classifier on ROSMAP by benchmarks/export_bench.py."""
    models, _ = trained_deq
    model = models["anderson"]
    held_out, _ = deq_held_out
    xs, reference = held_out_reference
    calibration = [[a[i : i + 1] for a in held_out] for i in range(64, 164)]
    path = export.to_tflite(model, tmp_path / "q.tflite", quantize=quantize, diagnostics=True,
                            representative_data=calibration)
    assert quantized_compute_in_solver_loop(path) == []
    from ai_edge_litert.interpreter import Interpreter

    run = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    names = export.input_names(model)
    got = [run(**{n: a[i : i + 1] for n, a in zip(names, xs)}) for i in range(len(xs[0]))]
    steps = np.array([int(r["deq_fusion_steps"][0]) for r in reference])
    got_steps = np.array([int(g["deq_fusion_steps"][0]) for g in got])
    converged = np.concatenate([g["deq_fusion_converged"] for g in got])
    within_two = np.abs(got_steps - steps) <= 2
    # Quantised weights make the solve a nearby problem: on this briefly trained model a few
    # samples (which ones depends on the training run's float rounding) take several steps
    # more, and int8 activations in the encoders move the injection further. Activations
    # quantised inside the loop would leave most solves unconverged.
    assert np.mean(converged) >= 0.95 and np.mean(within_two) >= 0.9, (got_steps, steps, converged)
    predictions = np.array([r["probabilities"].argmax() for r in reference])
    got_predictions = np.array([g["probabilities"].argmax() for g in got])
    assert np.mean(got_predictions == predictions) >= 0.95


def readme_snippets():
    """The ```python blocks of export/README.md, in order."""
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "export", "README.md")
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_export_readme_snippets_run_as_written(trained_deq, tmp_path, monkeypatch):
    models, xs = trained_deq
    model = models["anderson"]
    samples = [[a[i:i + 1] for a in xs] for i in range(len(xs[0]))]
    masked_model = with_modality_mask(model)
    namespace = dict(model=model, masked_model=masked_model, samples=samples, sample_inputs=xs,
                     x0=xs[0], x1=xs[1], x2=xs[2])
    monkeypatch.chdir(tmp_path)
    snippets = readme_snippets()
    assert len(snippets) >= 5
    for code in snippets:
        exec(compile(code, "export/README.md", "exec"), namespace)
    expected = model.predict(xs, verbose=0)
    # The last snippets leave the ONNX and TFLite results in the namespace.
    np.testing.assert_allclose(namespace["probabilities"], expected, atol=1e-4)
    assert namespace["converged"].dtype == bool and namespace["converged"].shape == (len(xs[0]),)
    np.testing.assert_allclose(namespace["trusted"], expected[namespace["out"]["deq_fusion_converged"]], atol=1e-4)
    assert "QUANTIZE" in export.tflite_report(tmp_path / "fusion_int8.tflite")["ops"]
    # strip_names=True leaves the int8 computation as it is and clears the names.
    feeds = dict(zip(export.input_names(model), xs))
    small, int8 = (str(tmp_path / f"fusion_int8{tail}.tflite") for tail in ("_small", ""))
    np.testing.assert_array_equal(export.run_export(small, feeds)["probabilities"],
                                  export.run_export(int8, feeds)["probabilities"])
    assert stripped_tensor_names(small)[0] == [] and stripped_tensor_names(int8)[0]
    # The masked model's snippet: view 1 absent, as Keras computes it.
    fed = [xs[0][:1], np.full_like(xs[1][:1], np.nan), xs[2][:1], np.array([[True, False, True]])]
    assert np.all(np.isfinite(namespace["masked_probabilities"]))
    np.testing.assert_allclose(namespace["masked_probabilities"], masked_model.predict(fed, verbose=0), atol=1e-5)


def stripped_tensor_names(path):
    """The names of the tensors of every subgraph but its inputs and outputs, and the
    number of subgraphs."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
    names = []
    for graph in flat.subgraphs:
        ends = set(graph.inputs) | set(graph.outputs)
        names += [t.name for i, t in enumerate(graph.tensors) if i not in ends and t.name]
    return names, len(flat.subgraphs)


def test_stripped_names_leave_the_computation_and_signature_unchanged(trained_deq, deq_held_out, tmp_path,
                                                                   tmp_path_factory):
    # strip_names=True rewrites the converted file: test_export_readme_snippets_run_as_written
    # compares int8 files written with and without it, this test the rewrite of a file
    # with the diagnostics signature (the one test_export_solver.py runs in every runtime).
    model = trained_deq[0]["anderson"]
    xs = [a[:16] for a in deq_held_out[0]]
    named = anderson_tflite(model, tmp_path_factory)
    stripped = str(tmp_path / "stripped.tflite")
    with open(named, "rb") as source, open(stripped, "wb") as target:
        target.write(export._without_tensor_names(source.read()))
    feeds = dict(zip(export.input_names(model), xs))
    expected, got = export.run_export(named, feeds), export.run_export(stripped, feeds)
    assert sorted(got) == sorted(expected) and "deq_fusion_steps" in got
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert export.tflite_report(stripped)["size_bytes"] < 0.85 * export.tflite_report(named)["size_bytes"]
    names, subgraphs = stripped_tensor_names(stripped)
    assert names == [] and stripped_tensor_names(named)[0]
    assert subgraphs == 3  # the main graph and the solver loop's condition and body
