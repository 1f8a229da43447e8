"""The history of past iterates that Anderson acceleration keeps, in two layouts.

Both layouts hold ``memory`` pairs ``(f(z_j), g_j = f(z_j) - z_j)`` of ``(batch, dim)``
tensors and the ``(batch, memory, memory)`` Gram matrix of the ``g_j``, and both give
the solver the same operations: add the newest pair, take the dot products of a vector
with every stored residual, and form the weighted sum of the stored ``f(z_j)``. They
differ in where entries live, and which one is cheaper depends on how the loop runs:

- :class:`RotatingHistory` carries ``memory`` separate tensors, newest first. A shift
  only rebinds tensors, which is free for TensorFlow's graph executor, but under XLA a
  loop whose carried buffers change places gets a copy of every moved buffer per step.
- :class:`CircularHistory` carries one ``(batch, memory, dim)`` buffer per quantity and
  overwrites slot ``k % memory``. XLA performs that write in place; without XLA the
  write copies the buffer.

:func:`history_for_current_graph` picks the layout for the graph being built.
:func:`empty_buffer`, :func:`write_slot`, :func:`slot_dots` and :func:`weighted_sum` are
the batch-first buffer operations, which Broyden's rank-one terms use as well.
"""

import tensorflow as tf

from keras_mmfusion.equilibrium.iteration import row_sum
from keras_mmfusion.graph_context import in_xla_context

try:  # XLA's own ops, for graphs that XLA compiles; no public API.
    from tensorflow.compiler.tf2xla.python import xla
except ImportError:  # pragma: no cover - a TensorFlow built without them
    xla = None


def history_for_current_graph(memory):
    """:class:`CircularHistory` under XLA, :class:`RotatingHistory` otherwise."""
    return CircularHistory(memory) if in_xla_context() else RotatingHistory(memory)


def empty_buffer(z, memory):
    """A zero ``(batch, memory, dim)`` buffer for states like ``z`` ``(batch, dim)``.

    The batch leads, so a product with a ``(batch, dim)`` vector over ``dim`` is a batched
    matrix product with no transpose of the buffer first.
    """
    return tf.zeros([tf.shape(z)[0], memory, z.shape[-1]], z.dtype)


def write_slot(buffer, slot, row):
    """``buffer`` ``(batch, memory, dim)`` with ``row`` ``(batch, dim)`` written at ``slot``.

    Under XLA, a dynamic-update-slice: XLA writes it in place, fused with the
    computation of ``row``. A scatter with one index per sample, which is what the
    write is without XLA, compiled to a separate scatter after ``row`` had been
    materialised, and took about twice as long on a CPU.
    """
    if in_xla_context() and xla is not None:
        start = tf.stack([0, tf.cast(slot, tf.int32), 0])
        return xla.dynamic_update_slice(buffer, tf.expand_dims(row, 1), start)
    batch = tf.shape(row)[0]
    index = tf.stack([tf.range(batch), tf.fill([batch], slot)], axis=-1)
    return tf.tensor_scatter_nd_update(buffer, index, row)


def slot_dots(buffer, x):
    """``(batch, memory)``: each sample's dot product of ``x`` ``(batch, dim)`` with its
    row in every slot of ``buffer`` ``(batch, memory, dim)``.

    A batched matrix product without XLA. Under XLA on a CPU that product took about
    1.5 times as long as the elementwise product summed by :func:`row_sum`, which is
    what it becomes there.
    """
    if not in_xla_context():
        return tf.einsum("bmd,bd->bm", buffer, x)
    products = tf.reshape(buffer * tf.expand_dims(x, 1), [-1, x.shape[-1]])
    return tf.reshape(row_sum(products), [-1, buffer.shape[1]])


def weighted_sum(buffer, weights):
    """``(batch, dim)``: ``sum_j weights[:, j] * buffer[:, j]`` for ``weights`` ``(batch, memory)``.

    A batched matrix product without XLA; under XLA an elementwise product summed
    over the slots, which XLA compiles to one vectorised loop and which took about
    half as long as the batched product on a CPU.
    """
    if not in_xla_context():
        return tf.einsum("bmd,bm->bd", buffer, weights)
    return tf.reduce_sum(buffer * tf.expand_dims(weights, -1), axis=1)


class RotatingHistory:
    """The history as ``memory`` separate tensors, newest first (slot 0)."""

    def __init__(self, memory):
        self.memory = memory

    def empty(self, z):
        zeros = tf.zeros_like(z)
        return (zeros,) * self.memory, (zeros,) * self.memory

    def push(self, fs, gs, fz, g, k):
        """The history with ``(fz, g)`` added as step ``k``'s entry, dropping the oldest."""
        return (fz,) + fs[:-1], (g,) + gs[:-1]

    def dots(self, gs, g):
        """``(batch, memory)``: ``g . g_j`` for every slot ``j``."""
        return tf.stack([tf.reduce_sum(g_j * g, axis=-1) for g_j in gs], axis=-1)

    def update_gram(self, gram, row, k):
        """The Gram matrix after :meth:`push`: ``row`` becomes row and column 0 and the
        old matrix moves one place down the diagonal."""
        m = self.memory
        # expand_dims, not row[:, 1:, None]: ``row`` is a tf.stack, and Grappler's
        # RemoveStackStridedSliceSameAxis rewrite drops the new axis of a slice that
        # keeps one stacked entry (memory 2), which broke the concat in graphs.
        lower = tf.concat([tf.expand_dims(row[:, 1:], -1), gram[:, : m - 1, : m - 1]], axis=2)
        return tf.concat([row[:, None, :], lower], axis=1)

    def newest(self, k, dtype):
        """``(memory,)`` one-hot weights that pick step ``k``'s entry."""
        return tf.one_hot(0, self.memory, dtype=dtype)

    def combine(self, values, alpha):
        """``sum_j alpha[:, j] * values_j`` for ``alpha`` of shape ``(batch, memory)``."""
        # expand_dims for the same Grappler rewrite as in update_gram: when ``alpha`` is a
        # tf.stack (e.g. straight from dots), alpha[:, j, None] came out as (batch,).
        return tf.add_n([tf.expand_dims(alpha[:, j], -1) * v for j, v in enumerate(values)])


class CircularHistory:
    """The history as one ``(batch, memory, dim)`` buffer; step ``k`` writes slot ``k % memory``."""

    def __init__(self, memory):
        self.memory = memory

    def empty(self, z):
        buffer = empty_buffer(z, self.memory)
        return buffer, buffer

    def push(self, fs, gs, fz, g, k):
        slot = k % self.memory
        return write_slot(fs, slot, fz), write_slot(gs, slot, g)

    def dots(self, gs, g):
        return slot_dots(gs, g)

    def update_gram(self, gram, row, k):
        """The Gram matrix with row and column ``k % memory`` replaced by ``row``."""
        hot = tf.one_hot(k % self.memory, self.memory, dtype=gram.dtype)
        in_row, in_column = hot[:, None], hot[None, :]
        replaced = in_column * row[:, :, None] + (1.0 - in_column) * gram
        return in_row * row[:, None, :] + (1.0 - in_row) * replaced

    def newest(self, k, dtype):
        return tf.one_hot(k % self.memory, self.memory, dtype=dtype)

    def combine(self, values, alpha):
        return weighted_sum(values, alpha)
