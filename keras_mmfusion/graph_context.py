"""What the graph being built will run on, for ops whose fastest form depends on it.

Both facts are read while a graph is traced, so a function traced once for XLA and once
without gets the form that suits each.
"""

import tensorflow as tf

from keras_mmfusion._internals import graph_in_xla_context


def in_xla_context():
    """Whether the ops being created now belong to a function compiled with XLA
    (``tf.function(jit_compile=True)``, and so Keras's ``jit_compile``)."""
    if tf.executing_eagerly():
        return False
    return graph_in_xla_context(tf.compat.v1.get_default_graph())


def gpu_visible():
    """Whether TensorFlow sees a GPU, and so places ops on it by default."""
    return bool(tf.config.list_logical_devices("GPU"))
