"""Post-training quantisation of a float32 ``.tflite`` file with ai-edge-quantizer.

The TFLite converter's own quantisation treats every constant and every tensor alike.
Two parts of a fusion model must stay in float32 for the deployed model to compute
what Keras computes:

- the input standardisation (per-feature mean and variance): rounding them to float16
  shifts every standardised feature;
- the equilibrium solver: its residual norms, divisions, Anderson's small linear
  system and its stopping test. Quantised activations inside the solver loop put a
  floor under the residual (about one quantisation step): the solve would not reach
  ``tol`` and would run to ``max_iter``.

The recipes here therefore quantise only ``FULLY_CONNECTED`` ops, the matrix products
of the encoders, the head, DynMM's experts and the fusion update:

- ``"float16"``: float16 weights (dequantised to float32 at load), float activations.
- ``"dynamic"``: int8 weights; activations quantised on the fly outside solver loops,
  float inside them.
- ``"int8"``, for a graph with control flow (a solver's ``WHILE``, DynMM's ``IF``
  branches): int8 weights; int8 activations, calibrated on representative data, outside
  solver loops; float activations inside them (weight-only int8). DynMM's experts run
  inside ``IF`` branches; each branch is calibrated on the samples routed to it,
  because calibration records the ranges of the ops that actually run. Everything
  else (normalisation, the solver, routing) stays float32.
- ``"int8"``, for a graph without control flow: the TFLite converter's full-integer
  quantisation of every op. The converter cannot quantise the graphs above (its int8
  ``DIV`` fails on the solver's small norms; it does not calibrate inside ``IF``
  branches), but on plain graphs it keeps more accuracy than quantising only the
  matrix products: on the test suite's concat-fusion classifier (float32 accuracy
  0.995), quantising only the matrix products gave 0.940, the converter stays within a
  point.
"""

import json
import re
import sys

import numpy as np

# An op inside a solver loop: tf.while_loop names its body's ops ``.../while/...``.
SOLVER_LOOP_SCOPE = r"(^|/)while(_\d+)?/"

RECIPES = ("float16", "dynamic", "int8")
CONTROL_FLOW_OPS = ("WHILE", "IF")


def _quantizer(float_model, quantize):
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    qt = quantizer.Quantizer(float_model)
    if quantize == "float16":
        qt.add_weight_only_config(".*", fc, 16, algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
        return qt
    if quantize == "dynamic":
        qt.add_dynamic_config(".*", fc, 8)
    else:
        qt.add_static_config(".*", fc, activation_num_bits=8, weight_num_bits=8)
    # The last matching rule wins: matrix products inside a solver loop keep float activations.
    qt.add_weight_only_config(SOLVER_LOOP_SCOPE, fc, 8)
    return qt


def quantize_tflite(float_model, quantize, calibration=None):
    """Quantise a float32 ``.tflite`` (path or bytes); returns the quantised flatbuffer.

    Args:
        float_model: the float32 model, a path or its bytes.
        quantize: one of :data:`RECIPES`.
        calibration: for ``"int8"``: a list of feeds (input name -> ``(1, d)`` array)
            of the ``serving_default`` signature.

    Raises:
        ValueError: ``"int8"`` without calibration data, or calibration that never ran
            some quantised op (for example a DynMM expert that no calibration sample
            is routed to); the message carries ai-edge-quantizer's, which names the
            tensor.
    """
    if quantize not in RECIPES:
        raise ValueError(f"quantize must be one of {RECIPES}, got {quantize!r}.")
    from ai_edge_quantizer.calibrator import CalibrationMode

    qt = _quantizer(float_model, quantize)
    result = None
    if qt.need_calibration:
        if not calibration:
            raise ValueError("int8 quantisation needs calibration samples; none were given.")
        # The profiler-based calibrator records every op that runs, in every subgraph and
        # on every loop iteration; the default mode misses the solver's WHILE body.
        result = qt.calibrate({"serving_default": calibration}, mode=CalibrationMode.CALIBRATION_PROFILER_BASED)
    try:
        return bytes(qt.quantize(result).quantized_model)
    except ValueError as error:
        if "not found in tensor_name_to_qsv" not in str(error):
            raise
        raise ValueError(
            "int8 calibration never ran some quantised op; give calibration samples that reach every "
            f"branch (for DynMM: samples routed to every expert). ai-edge-quantizer: {error}"
        ) from error


def full_integer_tflite(saved_model_dir, calibration, builtins_only=True):
    """The TFLite converter's full-integer int8 model of a SavedModel without control flow
    (with TF (Flex) ops allowed where no builtin fits, unless ``builtins_only``)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(calibration)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.target_spec.supported_ops = ops if builtins_only else ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def has_control_flow(float_model):
    """Whether a ``.tflite`` file has a ``WHILE`` or ``IF`` op in any subgraph."""
    from ai_edge_litert import schema_py_generated as schema

    with open(float_model, "rb") as f:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
    flow = {getattr(schema.BuiltinOperator, name) for name in CONTROL_FLOW_OPS}
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    return any(codes[op.opcodeIndex] in flow for graph in model.subgraphs for op in graph.operators or [])


def _worker(float_path, saved_model_dir, samples_path, out_path, builtins_only):
    """Subprocess entry point: quantise to int8, run the result once, write it.

    Running the quantised model once makes a kernel that fails on int8 data fail here,
    in a process that may crash, instead of in the caller's.
    """
    from ai_edge_litert.interpreter import Interpreter

    samples = np.load(samples_path)
    names = json.loads(str(samples["__names__"]))
    feeds = [{n: samples[n][i : i + 1] for n in names} for i in range(len(samples[names[0]]))]
    try:
        if has_control_flow(float_path):
            flatbuffer = quantize_tflite(float_path, "int8", feeds)
        else:
            flatbuffer = full_integer_tflite(saved_model_dir, feeds, builtins_only == "1")
        Interpreter(model_content=flatbuffer).get_signature_runner("serving_default")(**feeds[0])
    except Exception as error:  # report the library's own message to the parent process
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
    with open(out_path, "wb") as f:
        f.write(flatbuffer)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--int8-worker":
    _worker(*sys.argv[2:])
