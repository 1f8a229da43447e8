"""The history of past iterates that Anderson acceleration keeps.

The history holds ``memory`` pairs ``(f(z_j), g_j = f(z_j) - z_j)`` of ``(batch, dim)``
tensors in one ``(batch, memory, dim)`` buffer per quantity, and the ``(batch, memory,
memory)`` Gram matrix of the ``g_j``. Step ``k`` overwrites slot ``k % memory``.

Every loop variable of the solver loop is written by an op in each step; none is passed
on into another loop variable's slot, because the TFLite ``WHILE`` kernel does not carry
such a value over as TensorFlow does. A history rotated as ``(new,) + old[:-1]`` would
hold the newest value in every slot under TFLite, so an exported Anderson solve would
combine the wrong vectors and take other steps than Keras's solve. Written by index,
the history is the same in every runtime. Under XLA the write is in place; without XLA it
copies the buffer.

:func:`empty_buffer`, :func:`write_slot`, :func:`slot_dots` and :func:`weighted_sum` are
the batch-first buffer operations, which Broyden's rank-one terms use as well.
"""

import tensorflow as tf

from keras_mmfusion._internals import dynamic_update_slice
from keras_mmfusion.equilibrium.iteration import row_sum
from keras_mmfusion._internals import in_xla_context


def empty_buffer(z, memory):
    """A zero ``(batch, memory, dim)`` buffer for states like ``z`` ``(batch, dim)``.

    The batch leads, so a product with a ``(batch, dim)`` vector over ``dim`` is a batched
    matrix product with no transpose of the buffer first.
    """
    return tf.zeros([tf.shape(z)[0], memory, z.shape[-1]], z.dtype)


def write_slot(buffer, slot, row):
    """``buffer`` ``(batch, memory, dim)`` with ``row`` ``(batch, dim)`` written at ``slot``.

    Under XLA, a dynamic-update-slice, which XLA writes in place, fused with the
    computation of ``row``; XLA compiles a scatter to a separate op after ``row`` is
    materialised. Without XLA, a scatter with one index per sample.
    """
    if in_xla_context():
        start = tf.stack([0, tf.cast(slot, tf.int32), 0])
        return dynamic_update_slice(buffer, tf.expand_dims(row, 1), start)
    batch = tf.shape(row)[0]
    index = tf.stack([tf.range(batch), tf.fill([batch], slot)], axis=-1)
    return tf.tensor_scatter_nd_update(buffer, index, row)


def slot_dots(buffer, x):
    """``(batch, memory)``: each sample's dot product of ``x`` ``(batch, dim)`` with its
    row in every slot of ``buffer`` ``(batch, memory, dim)``.

    A batched matrix product without XLA. Under XLA, the elementwise product summed by
    :func:`row_sum`, which XLA compiles to faster code on a CPU than the batched product.
    """
    if not in_xla_context():
        return tf.einsum("bmd,bd->bm", buffer, x)
    products = tf.reshape(buffer * tf.expand_dims(x, 1), [-1, x.shape[-1]])
    return tf.reshape(row_sum(products), [-1, buffer.shape[1]])


def weighted_sum(buffer, weights):
    """``(batch, dim)``: ``sum_j weights[:, j] * buffer[:, j]`` for ``weights`` ``(batch, memory)``.

    A batched matrix product without XLA; under XLA an elementwise product summed
    over the slots, which XLA compiles to one vectorised loop, faster on a CPU than the
    batched product.
    """
    if not in_xla_context():
        return tf.einsum("bmd,bm->bd", buffer, weights)
    return tf.reduce_sum(buffer * tf.expand_dims(weights, -1), axis=1)


class CircularHistory:
    """The history as one ``(batch, memory, dim)`` buffer per quantity; step ``k`` writes slot ``k % memory``."""

    def __init__(self, memory):
        self.memory = memory

    def empty(self, z):
        """Zero buffers for ``f(z_j)`` and ``g_j``; unwritten slots get zero weight."""
        buffer = empty_buffer(z, self.memory)
        return buffer, buffer

    def push(self, fs, gs, fz, g, k):
        """The history with ``(fz, g)`` written as step ``k``'s entry, over the oldest."""
        slot = k % self.memory
        return write_slot(fs, slot, fz), write_slot(gs, slot, g)

    def dots(self, gs, g):
        """``(batch, memory)``: ``g . g_j`` for every slot ``j``."""
        return slot_dots(gs, g)

    def update_gram(self, gram, row, k):
        """The Gram matrix with row and column ``k % memory`` replaced by ``row``."""
        hot = tf.one_hot(k % self.memory, self.memory, dtype=gram.dtype)
        in_row, in_column = hot[:, None], hot[None, :]
        replaced = in_column * row[:, :, None] + (1.0 - in_column) * gram
        return in_row * row[:, None, :] + (1.0 - in_row) * replaced

    def newest(self, k, dtype):
        """``(memory,)`` one-hot weights that pick step ``k``'s entry."""
        return tf.one_hot(k % self.memory, self.memory, dtype=dtype)

    def combine(self, values, alpha):
        """``sum_j alpha[:, j] * values_j`` for ``alpha`` of shape ``(batch, memory)``."""
        return weighted_sum(values, alpha)
