"""What the graph being built will run on, for ops whose fastest form depends on it.

TensorFlow has no public query for either fact; both are read while a graph is traced,
so a function traced once for XLA and once without gets the form that suits each.
"""

import tensorflow as tf

try:  # Whether the graph being traced will be compiled by XLA; no public API.
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover - a TensorFlow without the helper
    GraphOrParentsInXlaContext = None


def in_xla_context():
    """Whether the ops being created now belong to a function compiled with XLA
    (``tf.function(jit_compile=True)``, and so Keras's ``jit_compile``)."""
    if tf.executing_eagerly() or GraphOrParentsInXlaContext is None:
        return False
    return bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def gpu_visible():
    """Whether TensorFlow sees a GPU, and so places ops on it by default."""
    return bool(tf.config.list_logical_devices("GPU"))
