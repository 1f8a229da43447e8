"""Export a trained model to SavedModel (TF Serving), TFLite/LiteRT and ONNX, and verify it.

Every format is produced from one serving function: one named input per modality
(the ``keras.Input`` names, shape ``(None, d_i)``) and a dict of named outputs. The
function is traced with layer statistics paused, so the exported graph only maps
inputs to outputs.

- ``to_saved_model`` writes TF Serving's ``base_dir/<version>/`` layout with a
  ``serving_default`` signature, plus a ``models.config`` example in ``base_dir``.
- ``to_tflite`` converts that SavedModel with ``tf.lite.TFLiteConverter`` and, by
  default, builtin ops only, so the file runs on a stock LiteRT runtime. An equilibrium
  solve becomes a builtin ``WHILE``; hard DynMM routing becomes ``WHERE``/``GATHER``/
  ``SCATTER_ND`` and one ``IF`` per expert, so an unchosen expert does not run.
  Quantised files are made from the float32 file by :mod:`keras_mmfusion.quantization`
  (ai-edge-quantizer), which quantises the matrix products and keeps the input
  standardisation and the solver in float32; int8 calibration runs in a subprocess,
  because a LiteRT kernel that fails on int8 data can crash the process.
- ``to_onnx`` converts the same function with tf2onnx (solver loops become ``Loop``).
- ``verify_export`` runs the artefact in its own runtime and compares with Keras.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from keras_mmfusion import quantization
from keras_mmfusion._internals import convert_select, freeze, onnx_graph_from_tf, optimize_onnx_graph
from keras_mmfusion.layer_statistics import collecting_solver_stats, statistics_paused

QUANTIZE_MODES = (None, "float16", "dynamic", "int8")


class ExportError(RuntimeError):
    """An export or conversion failed; the message says which step and why."""


# -- the serving function -----------------------------------------------------------


def _check_model(model):
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(f"Expected a keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"Model '{model.name}' has not been built with known inputs: build it (e.g. a "
            "functional model from keras.Input, or call it once) before exporting."
        )


def input_names(model):
    """The serving input names: the model's ``keras.Input`` names, in input order."""
    _check_model(model)
    return [t.name.split(":")[0] for t in model.inputs]


def output_names(model):
    """The serving output names: the model's output layer names."""
    names = list(getattr(model, "output_names", None) or [])
    outputs = model.outputs
    if len(names) != len(outputs):
        names = [f"output_{i}" for i in range(len(outputs))]
    return names


def input_signature(model):
    """One ``TensorSpec((None, d_i), name=...)`` per model input."""
    return [
        tf.TensorSpec((None,) + tuple(t.shape[1:]), tf.as_dtype(t.dtype), name=name)
        for t, name in zip(model.inputs, input_names(model))
    ]


DIAGNOSTICS = ("steps", "trace", "residual", "converged")


def serving_function(model, diagnostics=False):
    """A ``tf.function`` from the named modality inputs to a dict of named outputs.

    With ``diagnostics``, every equilibrium layer (``DEQFusion``) in the model adds four
    outputs, named after the layer: ``<layer>_steps`` ``(1,)`` int32, the evaluations of
    its update in the forward solve; ``<layer>_trace`` ``(max_iter,)``, the batch-mean
    residual after each evaluation (zero past ``steps``); ``<layer>_residual``
    ``(batch,)``, each sample's residual; and ``<layer>_converged`` ``(batch,)`` bool,
    whether it met the tolerance.
    """
    signature = input_signature(model)
    outputs = output_names(model)
    single_input = len(signature) == 1

    @tf.function(input_signature=signature)
    def serve(*xs):
        with statistics_paused(), collecting_solver_stats() as collected:
            result = model(xs[0] if single_input else list(xs), training=False)
        result = result if isinstance(result, (list, tuple)) else [result]
        named = {name: tf.identity(y, name=name) for name, y in zip(outputs, result)}
        if diagnostics:
            for layer, stats in collected.items():
                values = dict(stats._asdict(), steps=tf.reshape(stats.steps, [1]))
                for key in DIAGNOSTICS:
                    named[f"{layer}_{key}"] = tf.identity(values[key], name=f"{layer}_{key}")
        return named

    return serve


def _as_feed(model, sample_inputs):
    xs = sample_inputs if isinstance(sample_inputs, (list, tuple)) else [sample_inputs]
    names = input_names(model)
    if len(xs) != len(names):
        raise ValueError(f"sample_inputs has {len(xs)} arrays but the model has {len(names)} inputs {names}.")
    return {n: np.asarray(x, dtype=d) for n, x, d in zip(names, xs, _input_dtypes(model))}


def _check_writable(path, overwrite=False):
    """Refuse an output ``path`` that exists (unless ``overwrite``) or cannot be written.

    Called before any conversion work, so a refused export costs nothing. Every problem
    is an :class:`ExportError` naming the path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise ExportError(
            f"{path} exists; pass overwrite=True (mmfusion export --overwrite) to replace it."
        )
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ExportError(f"Cannot create the directory {parent}: {error.strerror}.") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Cannot write to {parent}: permission denied.")


def _replace(source, target):
    """Move the finished artefact ``source`` to ``target``, removing whatever is there."""
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.remove(target)
    shutil.move(source, target)


# -- SavedModel ---------------------------------------------------------------------


MODELS_CONFIG = """model_config_list {{
  config {{
    name: "{name}"
    base_path: "{base_path}"
    model_platform: "tensorflow"
  }}
}}
"""


def _write_saved_model(model, path, diagnostics=False):
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving_function(model, diagnostics))
    # The signatures serve inference. Saving the equilibrium solver's custom gradient
    # would trace its backward pass (solver loops and their gradients), which no
    # signature runs.
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    archive.write_out(os.fspath(path), options=options, verbose=False)


class _UnsavedGradientNotice(logging.Filter):
    """Drops TensorFlow's warning, on loading a SavedModel, that a function holds ops
    with unsaved custom gradients: this package saves its serving signatures without
    them on purpose (see :func:`_write_saved_model`) and never asks for their gradient."""

    def filter(self, record):
        return not str(record.msg).startswith("Importing a function (%s) with ops with unsaved custom gradients")


@contextlib.contextmanager
def _loading_own_saved_model():
    """Load a SavedModel this module wrote without the warning of :class:`_UnsavedGradientNotice`."""
    notice = _UnsavedGradientNotice()
    logger = logging.getLogger("absl")
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def to_saved_model(model, base_dir, version=1, model_name=None, diagnostics=False, overwrite=False):
    """Write a SavedModel in TF Serving's layout, ``base_dir/<version>/``.

    The ``serving_default`` signature takes one input per modality, named as the
    model's ``keras.Input`` layers, with a dynamic batch dimension, and returns the
    outputs named as the model's output layers, plus the solver's diagnostics with
    ``diagnostics=True`` (see :func:`serving_function`). The signature serves inference;
    the equilibrium solver's custom gradient is not saved with it. A ``models.config``
    example for ``tensorflow_model_server --model_config_file`` is written next to the
    versions.

    An existing version directory is refused with an :class:`ExportError`, or, with
    ``overwrite=True``, replaced whole once the new version has been written, so no
    stale files of the old one remain.

    Returns:
        The version directory.
    """
    _check_model(model)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}.")
    base_dir = os.path.abspath(os.fspath(base_dir))
    target = os.path.join(base_dir, str(version))
    _check_writable(target, overwrite)
    with tempfile.TemporaryDirectory(dir=base_dir) as tmp:
        written = os.path.join(tmp, "saved_model")
        _write_saved_model(model, written, diagnostics)
        _replace(written, target)
    name = model_name or os.path.basename(base_dir)
    with open(os.path.join(base_dir, "models.config"), "w") as f:
        f.write(MODELS_CONFIG.format(name=name, base_path=f"/models/{name}"))
    return target


# -- TFLite -------------------------------------------------------------------------


def _float_tflite(saved_model_dir, builtins_only):
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if not builtins_only:
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    with _loading_own_saved_model():
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
        converter.target_spec.supported_ops = ops
        return converter.convert()


def _input_dtypes(model):
    """The NumPy dtype of every model input, in input order."""
    return [np.dtype(tf.as_dtype(t.dtype).as_numpy_dtype) for t in model.inputs]


def _representative_arrays(model, representative_data):
    names = input_names(model)
    dtypes = dict(zip(names, _input_dtypes(model)))
    rows = {n: [] for n in names}
    for sample in representative_data:
        if isinstance(sample, dict):
            sample = [sample[n] for n in names]
        sample = sample if isinstance(sample, (list, tuple)) else [sample]
        if len(sample) != len(names):
            raise ValueError(
                f"Each representative sample must hold {len(names)} arrays (one per input {names}); got {len(sample)}."
            )
        for n, x in zip(names, sample):
            x = np.asarray(x, dtype=dtypes[n])
            rows[n].append(x.reshape((-1,) + x.shape[-1:])[:1])
    if not rows[names[0]]:
        raise ValueError("representative_data yielded no samples.")
    return {n: np.concatenate(v) for n, v in rows.items()}


def _quantize_int8(model, float_path, representative_data, out_path, tmp):
    """Run :func:`keras_mmfusion.quantization.quantize_tflite` for int8 in a subprocess."""
    samples = _representative_arrays(model, representative_data)
    samples_path = os.path.join(tmp, "samples.npz")
    np.savez(samples_path, __names__=json.dumps(list(samples)), **samples)
    # Run as a script, so that the subprocess does not import TensorFlow.
    command = [sys.executable, quantization.__file__, "--int8-worker", float_path, samples_path, out_path]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0 or not os.path.isfile(out_path):
        how = f"crashed with signal {-done.returncode}" if done.returncode < 0 else f"failed (exit {done.returncode})"
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        message = lines[-1].strip() if lines else "no message"
        raise ExportError(f"int8 quantisation of model '{model.name}' {how}: {message}")


def to_tflite(model, path, quantize=None, representative_data=None, builtins_only=True, diagnostics=False,
              overwrite=False, strip_names=False):
    """Convert ``model`` to a ``.tflite`` file.

    Args:
        model: a built Keras model.
        path: the output file.
        quantize: ``None`` (float32), ``"float16"`` (float16 weights),
            ``"dynamic"`` (int8 weights, activations quantised on the fly) or
            ``"int8"`` (int8 weights and activations, calibrated on
            ``representative_data``). Only the matrix products are quantised, and
            inside a solver loop only their weights; see
            :mod:`keras_mmfusion.quantization`.
        representative_data: for ``"int8"``: an iterable or ``tf.data.Dataset``
            yielding one sample at a time, a list with one ``(1, d_i)`` array per
            modality (or a dict keyed by input name). The samples set every
            quantised activation's range; for DynMM they must reach every expert,
            since calibration records only the ops that run, and an expert that no
            sample reaches is an :class:`ExportError`.
        builtins_only: allow only TFLite builtin ops (the default). ``False`` also
            allows TF (Flex) ops, which need the Flex delegate at run time.
        diagnostics: also return the solver's diagnostics (see :func:`serving_function`).
        overwrite: replace an existing ``path``; otherwise it is refused before any
            conversion work.
        strip_names: clear the names of the intermediate tensors. The inputs, outputs
            and serving signature keep theirs, and the file computes the same thing;
            it is smaller (a DEQ model's solver loop has hundreds of named tensors),
            and model viewers show no intermediate names.

    Returns:
        ``path``. :func:`tflite_report` gives the op list and file size.

    Raises:
        ValueError: a bad argument or an unbuilt model.
        ExportError: the conversion or quantisation failed; the message names the
            step and carries the converter's or quantizer's own message.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}.")
    if quantize == "int8" and representative_data is None:
        raise ValueError("quantize='int8' needs representative_data: samples to calibrate the activation ranges.")
    _check_model(model)
    path = os.fspath(path)
    _check_writable(path, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        _write_saved_model(model, saved, diagnostics)
        try:
            flatbuffer = _float_tflite(saved, builtins_only)
        except Exception as error:  # the converter raises ConverterError and others
            raise ExportError(f"TFLite conversion of model '{model.name}' failed: {error}") from error
        written = os.path.join(tmp, "model.tflite")
        with open(written, "wb") as f:
            f.write(flatbuffer)
        if quantize == "int8":
            quantized = os.path.join(tmp, "int8.tflite")
            _quantize_int8(model, written, representative_data, quantized, tmp)
            written = quantized
        elif quantize is not None:
            try:
                flatbuffer = quantization.quantize_tflite(flatbuffer, quantize)
            except Exception as error:  # ai-edge-quantizer raises ValueError and others
                raise ExportError(f"{quantize} quantisation of model '{model.name}' failed: {error}") from error
            with open(written, "wb") as f:
                f.write(flatbuffer)
        if strip_names:
            with open(written, "rb") as f:
                flatbuffer = _without_tensor_names(f.read())
            with open(written, "wb") as f:
                f.write(flatbuffer)
        _replace(written, path)
    return path


def _without_tensor_names(flatbuffer):
    """A ``.tflite`` file whose tensors, but the subgraphs' inputs and outputs, have no
    names. Signatures refer to tensors by index, so they are unaffected."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    for buffer in model.buffers or []:
        # Large files keep weights after the flatbuffer, addressed by offset and size;
        # the repacked flatbuffer holds them inline.
        if buffer.offset > 1:
            buffer.data = np.frombuffer(flatbuffer, np.uint8, count=buffer.size, offset=buffer.offset)
            buffer.offset = buffer.size = 0
    for subgraph in model.subgraphs:
        kept = set(subgraph.inputs if subgraph.inputs is not None else []) | set(
            subgraph.outputs if subgraph.outputs is not None else [])
        for index, tensor in enumerate(subgraph.tensors or []):
            if index not in kept:
                tensor.name = None
    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_report(path):
    """What a ``.tflite`` file holds.

    Returns:
        ``{"ops": sorted builtin op names over all subgraphs, "size_bytes": the file's
        size, "subgraphs": their number, "operators": the number of ops over all
        subgraphs, "buffer_bytes": the bytes of constant data (weights and other
        constants)}``. The rest of the file is the graph: ops, tensors and their names,
        signatures.
    """
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        buffer = f.read()
    flat = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buffer, 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for code in flat.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        codes.append(code.customCode.decode() if code.customCode else names.get(builtin, str(builtin)))
    ops = sorted({codes[op.opcodeIndex] for sg in flat.subgraphs for op in (sg.operators or [])})
    operators = sum(len(sg.operators or []) for sg in flat.subgraphs)
    constants = sum(len(b.data) if b.data is not None else int(b.size or 0) for b in flat.buffers or [])
    return {"ops": ops, "size_bytes": len(buffer), "subgraphs": len(flat.subgraphs), "operators": operators,
            "buffer_bytes": constants}


# -- ONNX ---------------------------------------------------------------------------


def to_onnx(model, path, opset=17, diagnostics=False, overwrite=False):
    """Convert ``model`` to ONNX with tf2onnx; returns ``path``.

    The serving function is frozen first, every captured tensor (variables and the
    constants layers such as ``keras.layers.Normalization`` keep, e.g. its mean and
    variance) becoming a constant of the graph, so the ONNX graph's only inputs are
    the modality inputs. Outputs keep the serving names (``probabilities``, ...).
    With ``diagnostics``, the graph also returns the solver's diagnostics (see
    :func:`serving_function`). An existing ``path`` is refused before any conversion
    work unless ``overwrite``.
    """
    import tf2onnx  # noqa: F401 - without the export extra, fail before any conversion work

    _check_model(model)
    path = os.fspath(path)
    _check_writable(path, overwrite)
    try:
        concrete = serving_function(model, diagnostics).get_concrete_function()
        # tf2onnx.convert.from_function freezes too, but keeps the function's captured
        # constants as required graph inputs.
        frozen = freeze(concrete)
        inputs = [t.name for t in frozen.inputs]
        outputs = [f"{name}:0" for name in concrete.structured_outputs]
        graph = _onnx_from_graph_def(frozen.graph.as_graph_def(add_shapes=True), inputs, outputs, opset, model.name)
    except Exception as error:
        raise ExportError(f"ONNX conversion of model '{model.name}' failed: {error}") from error
    names = {f"{name}:0": name for name in concrete.structured_outputs}
    names.update({tensor: tensor.split(":")[0] for tensor in inputs})
    _rename_onnx_values(graph.graph, names)
    with tempfile.TemporaryDirectory() as tmp:
        written = os.path.join(tmp, "model.onnx")
        with open(written, "wb") as f:
            f.write(graph.SerializeToString())
        _replace(written, path)
    return path


def _onnx_from_graph_def(graph_def, inputs, outputs, opset, name):
    """The ONNX model of a frozen ``graph_def``, as ``tf2onnx.convert.from_graph_def`` makes it.

    ``from_graph_def`` deep-copies the whole ONNX graph before each of its optimizers, on
    every pass, so that an optimizer that raises can be undone; a DEQ model's graph, with
    its solver loop bodies, is copied many times over. Here the optimizers run on the
    graph itself, and only if one of them raises is the conversion redone by
    ``from_graph_def``, undoing included. The graph is frozen already, so tf2onnx's own
    freezing step is left out.
    """
    import tf2onnx

    handlers = {op: (_select_as_where, []) for op in ("Select", "SelectV2")}
    onnx_graph = onnx_graph_from_tf(graph_def, inputs, outputs, opset, handlers)
    try:
        onnx_graph = optimize_onnx_graph(onnx_graph)
    except Exception:  # an optimizer failed part-way: convert again, with tf2onnx undoing it
        model_proto, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs,
                                                        opset=opset, custom_op_handlers=handlers)
        return model_proto
    return onnx_graph.make_model(f"converted from {name}")


def _select_as_where(ctx, node, name, args):
    """Convert TensorFlow's ``Select``/``SelectV2`` to ONNX ``Where``.

    tf2onnx's own conversion writes most selects as ``c * x + (1 - c) * y``, which is
    NaN wherever the branch not taken holds a NaN or an infinity; a model that
    replaces missing modalities' NaN placeholders by zeros with ``where`` would then
    output NaN in ONNX only. ``Where`` selects exactly, as TensorFlow does; selects of
    other dtypes keep tf2onnx's conversion.
    """
    from onnx import TensorProto

    # Other dtypes hold no NaN, and onnxruntime lacks Where for some (bool among them).
    floating = ctx.get_dtype(node.output[0]) in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    convert_select(ctx, node, handles_nan=floating)


def _rename_onnx_values(graph, names):
    """Rename values ``old -> new`` for every pair in ``names`` throughout an ONNX graph.

    Subgraphs (the bodies of ``Loop`` and ``If``) are renamed too, since they may read
    the outer graph's values by name.
    """
    import onnx

    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_onnx_values(attribute.g, names)
            for subgraph in attribute.graphs:
                _rename_onnx_values(subgraph, names)


# -- verification -------------------------------------------------------------------


def run_export(path, feed):
    """Run an exported artefact on ``feed`` (input name -> array); returns name -> array."""
    path = os.fspath(path)
    if os.path.isdir(path):
        with _loading_own_saved_model():
            loaded = tf.saved_model.load(path)
        fn = loaded.signatures["serving_default"]
        return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feed.items()}).items()}
    if path.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        runner = interpreter.get_signature_runner("serving_default")
        return {k: np.asarray(v) for k, v in runner(**feed).items()}
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    raise ValueError(f"{path}: not a SavedModel directory, .tflite or .onnx file.")


def verify_export(model, path, sample_inputs):
    """Compare an exported artefact with ``model(sample_inputs, training=False)``.

    Args:
        model: the Keras model that was exported.
        path: a SavedModel directory, a ``.tflite`` or an ``.onnx`` file.
        sample_inputs: one array ``(batch, d_i)`` per modality.

    Returns:
        ``{output_name: {"max_abs": ..., "max_rel": ...}}``, where ``max_rel`` is the
        largest absolute difference divided by the largest magnitude of the Keras
        output (a scale-aware relative error that stays finite near zero).
    """
    feed = _as_feed(model, sample_inputs)
    xs = list(feed.values())
    with statistics_paused():
        reference = model(xs[0] if len(xs) == 1 else xs, training=False)
    reference = reference if isinstance(reference, (list, tuple)) else [reference]
    exported = run_export(path, feed)
    report = {}
    for name, ref in zip(output_names(model), reference):
        ref = np.asarray(ref, dtype=np.float64)
        # ONNX graphs from tf2onnx keep the signature's output names, possibly suffixed.
        key = name if name in exported else next(k for k in exported if k.startswith(name))
        got = np.asarray(exported[key], dtype=np.float64)
        if got.shape != ref.shape:
            raise ExportError(f"{path}: output '{name}' has shape {got.shape}, Keras gives {ref.shape}.")
        diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
        report[name] = {"max_abs": diff, "max_rel": diff / max(float(np.max(np.abs(ref))), 1e-12)}
    return report

