"""Hard per-sample routing that runs each expert only on the samples sent to it.

Kept apart from the DynMM layer because it is pure TensorFlow: given a route per sample
and a list of branch functions, it gathers each branch's rows, runs the branch under a
``tf.cond`` that skips it when it received no rows, and scatters the results back.
Every op used (``Where``, ``GatherV2``, ``ScatterNd``, ``If``) is a TFLite builtin, so a
batch of one runs exactly one branch on device too.

XLA needs static shapes, so inside an XLA cluster the rows cannot be gathered; there
every branch runs on the whole batch and the outputs are selected by the route.
"""

import tensorflow as tf


def masked_route(route, branches, inputs, dtype):
    """Run every branch on the full batch and pick each sample's branch output."""
    outputs = tf.stack([tf.cast(branch(inputs), dtype) for branch in branches], axis=1)
    pick = tf.one_hot(route, len(branches), dtype=dtype)
    return tf.einsum("be,bed->bd", pick, outputs)


def partitioned_route(route, branches, inputs, width, dtype):
    """Run branch ``i`` on the rows with ``route == i`` only, and stitch the rows back.

    Args:
        route: int32 ``(batch,)`` branch index per sample.
        branches: functions mapping a list of ``(rows, d_j)`` tensors to ``(rows, width)``.
        inputs: the list of ``(batch, d_j)`` tensors.
        width: the common output width of the branches.
        dtype: the output dtype.

    Returns:
        ``(batch, width)``.
    """
    batch = tf.shape(route)[0]
    out_shape = tf.stack([batch, width])
    result = tf.zeros(out_shape, dtype)
    for i, branch in enumerate(branches):
        rows = tf.where(tf.equal(route, i))  # (rows, 1) int64

        def run(branch=branch, rows=rows):
            # The reshape restates the static width, which exporters lose through the gather.
            picked = [tf.reshape(tf.gather(x, rows[:, 0]), [-1, x.shape[-1]]) for x in inputs]
            return tf.scatter_nd(rows, tf.cast(branch(picked), dtype), tf.cast(out_shape, tf.int64))

        result += tf.cond(tf.size(rows) > 0, run, lambda: tf.zeros(out_shape, dtype))
    return result
