"""The private TensorFlow and Keras APIs the package uses, imported here and nowhere else.

Each has no public equivalent. Private APIs change without notice, so they are wrapped
here, each wrapper is tested in ``tests/test_internals.py``, and importing the package
with a TensorFlow or Keras outside the tested versions warns.
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
TESTED_VERSIONS = {"tensorflow": ("2.21",), "keras": ("3.13", "3.14", "3.15")}


def untested_versions(versions=None):
    """``{library: version}`` for the installed libraries outside :data:`TESTED_VERSIONS`."""
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
            f"keras_mmfusion uses private TensorFlow/Keras APIs tested with {TESTED_VERSIONS}; found {found}.",
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


def graph_in_xla_context(graph):
    """Whether ``graph`` (or a graph it is nested in) will be compiled by XLA."""
    return bool(_control_flow_util.GraphOrParentsInXlaContext(graph))


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


warn_on_untested_versions()
