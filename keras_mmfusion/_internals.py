"""The private TensorFlow, Keras and tf2onnx APIs the package uses, imported here and nowhere else.

Each has no public equivalent. Private APIs change without notice, so they are wrapped
here, each wrapper is tested in ``tests/test_internals.py``, and importing the package
with a TensorFlow or Keras outside the tested versions warns; so does the first ONNX
conversion with a tf2onnx outside them. tf2onnx belongs to the ``export`` extra and is
imported only when a conversion runs.
"""

import contextlib
import warnings

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla as _xla
from tensorflow.python.eager import record as _record
from tensorflow.python.framework import convert_to_constants as _convert_to_constants
from tensorflow.python.ops import control_flow_util as _control_flow_util

# The versions these wrappers were tested with (major.minor prefixes).
TESTED_VERSIONS = {"tensorflow": ("2.21",), "keras": ("3.13", "3.14", "3.15"), "tf2onnx": ("1.17",)}


def untested_versions(versions=None):
    """``{library: version}`` for the given (default: the installed TensorFlow and Keras)
    libraries outside :data:`TESTED_VERSIONS`."""
    versions = versions or {"tensorflow": tf.__version__, "keras": keras.__version__}
    return {
        name: version
        for name, version in versions.items()
        if not any(version == tested or version.startswith(tested + ".") for tested in TESTED_VERSIONS[name])
    }


def warn_on_untested_versions(versions=None):
    untested = untested_versions(versions)
    if untested:
        found = ", ".join(f"{name} {version}" for name, version in untested.items())
        warnings.warn(
            f"keras_mmfusion uses private TensorFlow/Keras/tf2onnx APIs tested with {TESTED_VERSIONS}; "
            f"found {found}.",
            RuntimeWarning,
            stacklevel=2,
        )


@contextlib.contextmanager
def stop_recording():
    """Keep the ops created in the block off every active gradient tape.

    ``tf.recompute_grad`` uses the same call to keep a custom-gradient forward pass off
    the tapes.
    """
    with _record.stop_recording():
        yield


def dynamic_update_slice(buffer, update, start):
    """XLA's in-place ``DynamicUpdateSlice``, for graphs that XLA compiles."""
    return _xla.dynamic_update_slice(buffer, update, start)


def in_xla_context():
    """Whether the ops being created now belong to a function compiled with XLA
    (``tf.function(jit_compile=True)``, and so Keras's ``jit_compile``).

    Read while a graph is traced, so a function traced once for XLA and once without
    gets the form of an op that suits each.
    """
    if tf.executing_eagerly():
        return False
    return bool(_control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def gpu_visible():
    """Whether TensorFlow sees a GPU, and so places ops on it by default (public API;
    kept beside :func:`in_xla_context`, the other fact about where a graph runs)."""
    return bool(tf.config.list_logical_devices("GPU"))


def freeze(concrete_function):
    """``concrete_function`` with its variables and captured tensors as graph constants."""
    return _convert_to_constants.convert_variables_to_constants_v2(
        concrete_function, lower_control_flow=False, aggressive_inlining=True
    )


def sublayers(layer, include_self=False):
    """Every layer nested in ``layer``, depth first (Keras's own traversal)."""
    return list(layer._flatten_layers(include_self=include_self))


def connected_layers(layer):
    """Every layer of the functional graphs ``layer`` has been called in, itself included.

    Follows the call nodes Keras records when a layer is called on symbolic inputs (the
    nodes of every call, those that fed them and those they fed), and includes the layers nested in every layer found.
    A layer only ever called on tensors (a subclassed model's) is connected to itself alone.
    """
    found = {id(layer): layer}
    stack = list(layer._inbound_nodes) + list(layer._outbound_nodes)
    visited = set()
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        operation = node.operation
        for connected in [operation] + (sublayers(operation) if isinstance(operation, keras.layers.Layer) else []):
            found.setdefault(id(connected), connected)
        stack.extend(node.parent_nodes)
        stack.extend(operation._inbound_nodes)
        stack.extend(operation._outbound_nodes)
    return list(found.values())


def _tf2onnx():
    """The ``tf2onnx`` module, after a warning if its version is untested."""
    import tf2onnx

    warn_on_untested_versions({"tf2onnx": tf2onnx.__version__})
    return tf2onnx


def onnx_graph_from_tf(graph_def, inputs, outputs, opset, custom_op_handlers):
    """The unoptimised tf2onnx graph of a frozen ``graph_def``: the two steps
    ``tf2onnx.convert.from_graph_def`` takes before its optimizers (grappler's
    ``tf_optimize``, then ``process_tf_graph``), without its freezing step."""
    _tf2onnx()
    from tf2onnx import tf_loader
    from tf2onnx.tfonnx import process_tf_graph

    with tf.device("/cpu:0"), tf.Graph().as_default():
        optimized = tf_loader.tf_optimize(inputs, outputs, graph_def)
    with tf.Graph().as_default() as tf_graph:
        tf.import_graph_def(optimized, name="")
        return process_tf_graph(tf_graph, continue_on_error=True, opset=opset, custom_op_handlers=custom_op_handlers,
                                input_names=inputs, output_names=outputs)


def optimize_onnx_graph(onnx_graph):
    """tf2onnx's optimizers run on ``onnx_graph`` in place; an optimizer that fails raises."""
    from tf2onnx import optimizer

    return optimizer.optimize_graph(onnx_graph, catch_errors=False)


def convert_select(ctx, node, handles_nan):
    """tf2onnx's own conversion of a ``Select``/``SelectV2`` node, told with ``handles_nan``
    to emit an exact ONNX ``Where`` instead of arithmetic on both branches."""
    from tf2onnx.onnx_opset.controlflow import Select

    if handles_nan:
        node.set_attr("handles_nan", True)
    Select.version_9(ctx, node)


warn_on_untested_versions()
