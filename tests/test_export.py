"""Every fusion layer survives SavedModel, TFLite and ONNX export with Keras's outputs (DEQ
fusion in test_export_solver.py, with its solver's steps)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion import export
from keras_mmfusion.training import build_before_tracing

WIDTHS = (6, 10, 8)
UNITS = 8


def make_fusion(name):
    return {
        "dynmm": lambda: mmf.DynamicFusion(
            [keras.layers.Dense(UNITS, activation="relu"), mmf.ConcatFusion(UNITS, activation="relu")],
            expert_inputs=[[0], [0, 1, 2]], name="dynmm",
        ),
        "dmf": lambda: mmf.DenseFusion(UNITS, depth=2),
        "concat": lambda: mmf.ConcatFusion(UNITS, activation="relu"),
        "sum": lambda: mmf.SumFusion(UNITS, activation="relu"),
        "gated": lambda: mmf.GatedFusion(UNITS),
        "tensor": lambda: mmf.TensorFusion(UNITS, activation="relu"),
        "lowrank": lambda: mmf.LowRankTensorFusion(UNITS, rank=3, activation="relu"),
    }[name]()


# DEQ fusion's exports are checked on a trained DEQ classifier, with its solver's steps, in
# every runtime by test_export_solver.py.
NAMES = ["dynmm", "dmf", "concat", "sum", "gated", "tensor", "lowrank"]


def data(n, seed):
    return mmf.make_synthetic(n, num_modalities=3, widths=list(WIDTHS), noise=0.3, seed=seed)


@pytest.fixture(scope="module")
def trained():
    """One briefly trained classifier per fusion layer, plus held-out data."""
    x, y = data(1400, seed=7)
    train = ([a[:1000] for a in x], y[:1000])
    test = ([a[1000:] for a in x], y[1000:])
    models = {}
    for name in NAMES:
        keras.utils.set_random_seed(0)
        fusion = make_fusion(name)
        model = mmf.models.build_classifier(fusion, WIDTHS, 2, encoder_units=UNITS, head_units=UNITS)
        model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        build_before_tracing(model, *train)
        # Trained to the int8 test's accuracy.
        model.fit(*train, epochs=15, batch_size=64, verbose=0)
        models[name] = model
    return models, train, test


def batches(test):
    x = test[0]
    return {"batch1": [a[:1] for a in x], "batch7": [a[1:8] for a in x]}


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_matches_keras_with_named_inputs(name, trained, tmp_path):
    models, _, test = trained
    model = models[name]
    path = export.to_saved_model(model, tmp_path / "serving", version=3)
    assert path == str(tmp_path / "serving" / "3")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert "base_path" in (tmp_path / "serving" / "models.config").read_text()
    signature = tf.saved_model.load(path).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["modality_0", "modality_1", "modality_2"]
    assert list(signature.structured_outputs) == ["probabilities"]
    for x in batches(test).values():
        errors = export.verify_export(model, path, x)
        assert errors["probabilities"]["max_abs"] <= 1e-5, errors


@pytest.mark.parametrize("name", NAMES)
def test_tflite_float32_and_float16_match_keras_with_builtin_ops_only(name, trained, tmp_path):
    models, _, test = trained
    model = models[name]
    for quantize, tolerance, key in ((None, 1e-4, "max_rel"), ("float16", 1e-2, "max_abs")):
        path = export.to_tflite(model, tmp_path / f"{name}_{quantize}.tflite", quantize=quantize)
        report = export.tflite_report(path)
        assert report["size_bytes"] == os.path.getsize(path)
        assert not [op for op in report["ops"] if op.startswith("Flex") or op == "CUSTOM"], report
        for x in batches(test).values():
            errors = export.verify_export(model, path, x)
            assert errors["probabilities"][key] <= tolerance, (quantize, errors)
    if name == "dynmm":
        assert "IF" in report["ops"] and "SCATTER_ND" in report["ops"]


def test_float16_keeps_the_input_standardisation_in_float32(tmp_path):
    """Features around 1000 with spread 0.1: a mean rounded to float16 (steps of 0.5)
    would shift them by up to 2.5 standard deviations."""
    x, y = data(600, seed=3)
    x = [1000.0 + 0.1 * a for a in x]
    keras.utils.set_random_seed(0)
    model = mmf.models.build_classifier(make_fusion("concat"), WIDTHS, 2, encoder_units=UNITS, head_units=UNITS,
                                        standardize_with=x)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    path = export.to_tflite(model, tmp_path / "f16.tflite", quantize="float16")
    assert "DEQUANTIZE" in export.tflite_report(path)["ops"]  # the Dense kernels are float16
    errors = export.verify_export(model, path, [a[:64] for a in x])
    assert errors["probabilities"]["max_abs"] <= 2e-3, errors


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_keras(name, trained, tmp_path):
    models, _, test = trained
    model = models[name]
    path = export.to_onnx(model, tmp_path / f"{name}.onnx")
    for x in batches(test).values():
        errors = export.verify_export(model, path, x)
        assert errors["probabilities"]["max_abs"] <= 1e-4, errors


def test_onnx_optimizers_run_in_place_and_a_failing_one_falls_back_to_tf2onnxs_undo(trained, tmp_path, monkeypatch):
    """to_onnx runs tf2onnx's optimizers without its per-optimizer graph copies; when one
    raises, the conversion is redone by tf2onnx.convert.from_graph_def, which undoes it."""
    import onnx
    from tf2onnx import optimizer

    models, _, test = trained
    model = models["gated"]
    in_place = onnx.load(export.to_onnx(model, tmp_path / "in_place.onnx"))
    calls = []

    class Failing:
        graph_been_opt = False

        def optimize(self, graph, iteration):
            calls.append(iteration)
            raise RuntimeError("an optimizer that fails")

    monkeypatch.setitem(optimizer._optimizers, "failing", Failing)
    path = export.to_onnx(model, tmp_path / "fallback.onnx")
    # Raised once in place, then once per pass of tf2onnx's own conversion.
    assert len(calls) >= 2, calls
    fallback = onnx.load(path)
    # The same ops; tf2onnx's copies renumber the generated constant names and node order.
    assert sorted(n.op_type for n in fallback.graph.node) == sorted(n.op_type for n in in_place.graph.node)
    errors = export.verify_export(model, path, batches(test)["batch7"])
    assert errors["probabilities"]["max_abs"] <= 1e-4, errors


# int8 of a trained DEQ classifier, with its solver's steps, is tested in
# test_export_quantized.py. Concat and sum fusion quantize no op that the others do not: DynMM holds a ConcatFusion expert, and
# the gated and low-rank layers add their modality terms.
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("concat", "sum")])
def test_int8_accuracy_within_one_point_with_builtin_ops(name, trained, tmp_path):
    models, train, test = trained
    model = models[name]
    representative = ([a[i : i + 1] for a in train[0]] for i in range(200))
    path = export.to_tflite(model, tmp_path / f"{name}_int8.tflite", quantize="int8", representative_data=representative)
    ops = export.tflite_report(path)["ops"]
    assert "QUANTIZE" in ops and not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    float_accuracy = float(np.mean(model.predict(test[0], verbose=0).argmax(-1) == test[1]))
    feed = dict(zip(export.input_names(model), test[0]))
    probabilities = export.run_export(path, feed)["probabilities"]
    int8_accuracy = float(np.mean(probabilities.argmax(-1) == test[1]))
    assert float_accuracy > 0.7
    assert int8_accuracy >= float_accuracy - 0.01, (int8_accuracy, float_accuracy)


def test_int8_ranges_cover_every_calibration_sample(tmp_path):
    """The activation ranges are the minimum and maximum over all calibration samples: the
    largest sample, given last, comes out as float32 does, not clipped to the ranges of
    the samples before it."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3, name="probabilities")(keras.layers.Dense(8, name="dense")(inputs)))
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(1, 4)).astype("float32") for _ in range(40)] + [np.full((1, 4), 8.0, "float32")]
    path = export.to_tflite(model, tmp_path / "int8.tflite", quantize="int8", representative_data=samples)
    assert "QUANTIZE" in export.tflite_report(path)["ops"]
    got = export.run_export(path, {"x": np.concatenate(samples)})["probabilities"]
    expected = model.predict(np.concatenate(samples), verbose=0)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.03 * scale, np.abs(got - expected).max(-1)


def test_int8_calibration_must_reach_every_dynmm_expert(trained, tmp_path):
    models, train, _ = trained
    model = models["dynmm"]
    layer = model.get_layer("dynmm")
    model.predict(train[0], batch_size=len(train[1]), verbose=0)
    route = np.asarray(layer.last_routing)
    assert 0 < np.mean(route == 0) < 1, np.bincount(route)
    cheap_only = np.flatnonzero(route == 0)[:50]
    representative = [[a[i : i + 1] for a in train[0]] for i in cheap_only]
    path = tmp_path / "dynmm_int8.tflite"
    with pytest.raises(export.ExportError, match="int8 quantisation of model .* failed .*: ValueError: int8 "
                       "calibration never ran some quantised op; .* samples routed to every expert"):
        export.to_tflite(model, path, quantize="int8", representative_data=representative)
    assert not path.exists()


def test_serving_signature_takes_a_rest_instances_body(trained, tmp_path):
    """The tensors a REST ``instances`` body decodes to, fed to the signature."""
    models, _, test = trained
    model = models["dmf"]
    path = export.to_saved_model(model, tmp_path / "serving")
    instances = [{f"modality_{i}": test[0][i][row].tolist() for i in range(3)} for row in range(4)]
    columns = {k: tf.constant([inst[k] for inst in instances], tf.float32) for k in instances[0]}
    outputs = tf.saved_model.load(path).signatures["serving_default"](**columns)
    expected = model.predict([a[:4] for a in test[0]], verbose=0)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_saved_model_cli_show_and_run(trained, tmp_path):
    cli = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this Python")
    models, _, test = trained
    path = export.to_saved_model(models["concat"], tmp_path / "serving")
    show = subprocess.run([cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, check=True).stdout
    assert "modality_0" in show and "probabilities" in show and "(-1, 6)" in show
    expr = ";".join(f"modality_{i}={test[0][i][:2].tolist()}" for i in range(3))
    run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
                          "--input_exprs", expr], capture_output=True, text=True, check=True).stdout
    expected = models["concat"].predict([a[:2] for a in test[0]], verbose=0)
    assert "probabilities" in run
    numbers = np.array([float(v) for v in run.split("[[")[-1].split("]]")[0].replace("]", " ").replace("[", " ").split()])
    np.testing.assert_allclose(numbers, expected.ravel(), rtol=1e-4, atol=1e-5)


def test_real_model_server_when_installed(trained, tmp_path):
    server = shutil.which("tensorflow_model_server")
    if server is None:
        pytest.skip("tensorflow_model_server is not on PATH (TF Serving is installed from apt or docker, not pip)")
    import json
    import socket
    import time
    import urllib.request

    models, _, test = trained
    base = tmp_path / "fusion"
    export.to_saved_model(models["concat"], base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, f"--rest_api_port={port}", "--port=0", "--model_name=fusion",
                             f"--model_base_path={base}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"instances": [{f"modality_{i}": test[0][i][0].tolist() for i in range(3)}]}).encode()
        for _ in range(60):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/fusion:predict", data=body)
                reply = json.loads(urllib.request.urlopen(request, timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("tensorflow_model_server did not answer")
    finally:
        proc.terminate()
    expected = models["concat"].predict([a[:1] for a in test[0]], verbose=0)
    np.testing.assert_allclose(np.array(reply["predictions"]), expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_give_clear_errors(trained, tmp_path):
    models, _, _ = trained
    model = models["concat"]
    with pytest.raises(ValueError, match=r"quantize must be one of"):
        export.to_tflite(model, tmp_path / "m.tflite", quantize="int4")
    with pytest.raises(ValueError, match=r"int8' needs representative_data"):
        export.to_tflite(model, tmp_path / "m.tflite", quantize="int8")
    # A directory that cannot be created or written, even by root: one under a file.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(export.ExportError, match="Cannot create the directory .*a_file"):
        export.to_tflite(model, blocker / "sub" / "m.tflite")
    with pytest.raises(export.ExportError, match="Cannot create the directory .*a_file"):
        export.to_onnx(model, blocker / "m.onnx")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has not been built"):
        export.to_saved_model(unbuilt, tmp_path / "x")


def test_existing_outputs_are_refused_or_replaced_whole(trained, tmp_path, monkeypatch):
    models, _, test = trained
    model = models["concat"]
    x = batches(test)["batch7"]
    tflite = export.to_tflite(model, tmp_path / "m.tflite")
    onnx_path = export.to_onnx(model, tmp_path / "m.onnx")
    version = export.to_saved_model(model, tmp_path / "serving", version=2)
    stale = os.path.join(version, "stale.txt")
    open(stale, "w").close()

    def no_conversion(*args, **kwargs):
        raise AssertionError("a refused export must not start converting")

    with monkeypatch.context() as patch:
        patch.setattr(export, "serving_function", no_conversion)
        for call, path in ((lambda: export.to_tflite(model, tflite), tflite),
                           (lambda: export.to_onnx(model, onnx_path), onnx_path),
                           (lambda: export.to_saved_model(model, tmp_path / "serving", version=2), version)):
            with pytest.raises(export.ExportError, match=f"{path} exists; pass overwrite=True"):
                call()
    assert os.path.isfile(stale)
    export.to_saved_model(model, tmp_path / "serving", version=2, overwrite=True)
    assert not os.path.exists(stale)  # replaced whole, not written over
    for path in (export.to_tflite(model, tflite, overwrite=True), export.to_onnx(model, onnx_path, overwrite=True),
                 version):
        assert export.verify_export(model, path, x)["probabilities"]["max_abs"] <= 1e-4


def stored_after_the_flatbuffer(flatbuffer):
    """The same model with its largest weight buffer stored after the flatbuffer and
    addressed by offset and size, the layout converters use for large models."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    index = max(range(len(model.buffers)), key=lambda i: 0 if model.buffers[i].data is None else len(model.buffers[i].data))
    data = bytes(model.buffers[index].data)
    model.buffers[index].data, model.buffers[index].size = None, len(data)

    def packed(offset):
        model.buffers[index].offset = offset
        builder = flatbuffers.Builder(len(flatbuffer))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    start = (len(packed(1 << 40)) + 15) // 16 * 16
    head = packed(start)
    return head + b"\0" * (start - len(head)) + data


def test_stripping_names_keeps_weights_stored_after_the_flatbuffer(trained, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model, _, test = trained[0]["concat"], trained[1], trained[2]
    path = export.to_tflite(model, tmp_path / "concat.tflite")
    with open(path, "rb") as f:
        external = stored_after_the_flatbuffer(f.read())
    feeds = dict(zip(export.input_names(model), [a[:16] for a in test[0]]))

    def run(content):
        return Interpreter(model_content=content).get_signature_runner("serving_default")(**feeds)["probabilities"]

    expected = model.predict([a[:16] for a in test[0]], verbose=0)
    np.testing.assert_allclose(run(external), expected, atol=1e-5)
    np.testing.assert_array_equal(run(export._without_tensor_names(external)), run(external))
