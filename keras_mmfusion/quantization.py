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
of the encoders, the head, DynMM's experts and the fusion update, in every graph:

- ``"float16"``: float16 weights (dequantised to float32 at load), float activations.
- ``"dynamic"``: int8 weights; activations quantised on the fly outside solver loops,
  float inside them.
- ``"int8"``: int8 weights (per output channel); int8 activations, calibrated on
  representative data, outside solver loops; float activations inside them
  (weight-only int8). DynMM's experts run inside ``IF`` branches; each branch is
  calibrated on the samples routed to it, because calibration records the ranges of
  the ops that actually run. Everything else (normalisation, the solver, routing)
  stays float32.

The TFLite converter's full-integer quantisation is not used: it cannot quantise a
solver loop (its int8 ``DIV`` fails on the solver's small norms) nor calibrate inside
``IF`` branches, and on plain graphs it also quantises the raw inputs ahead of the
standardisation, which rounds every feature before it is standardised.
"""

import json
import sys

import numpy as np

# An op inside a solver loop: tf.while_loop names its body's ops ``.../while/...``.
SOLVER_LOOP_SCOPE = r"(^|/)while(_\d+)?/"

RECIPES = ("float16", "dynamic", "int8")


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
        # One batch of every sample: ai-edge-quantizer keeps, per tensor, a moving average
        # (0.95 old, 0.05 new) of the ranges of its calibration steps, so sample by sample
        # the ranges are those of the first samples, and later samples' larger activations
        # are clipped. One step records the minimum and maximum over all samples.
        # The profiler-based calibrator records every op that runs, in every subgraph and
        # on every loop iteration; the default mode misses the solver's WHILE body.
        batch = {name: np.concatenate([feed[name] for feed in calibration]) for name in calibration[0]}
        result = qt.calibrate({"serving_default": [batch]}, mode=CalibrationMode.CALIBRATION_PROFILER_BASED)
    try:
        return bytes(qt.quantize(result).quantized_model)
    except ValueError as error:
        if "not found in tensor_name_to_qsv" not in str(error):
            raise
        raise ValueError(
            "int8 calibration never ran some quantised op; give calibration samples that reach every "
            f"branch (for DynMM: samples routed to every expert). ai-edge-quantizer: {error}"
        ) from error


def _worker(float_path, samples_path, out_path):
    """Subprocess entry point: quantise to int8, run the result once, write it.

    Running the quantised model once makes a kernel that fails on int8 data fail here,
    in a process that may crash, instead of in the caller's.
    """
    from ai_edge_litert.interpreter import Interpreter

    samples = np.load(samples_path)
    names = json.loads(str(samples["__names__"]))
    feeds = [{n: samples[n][i : i + 1] for n in names} for i in range(len(samples[names[0]]))]
    try:
        flatbuffer = quantize_tflite(float_path, "int8", feeds)
        Interpreter(model_content=flatbuffer).get_signature_runner("serving_default")(**feeds[0])
    except Exception as error:  # report the library's own message to the parent process
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
    with open(out_path, "wb") as f:
        f.write(flatbuffer)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--int8-worker":
    _worker(*sys.argv[2:])
