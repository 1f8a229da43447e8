"""Carry non-finite input samples through to the output as NaN."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class PropagateNonFinite(keras.layers.Layer):
    """Make a sample's row NaN wherever one of its source rows is not finite.

    Called as ``PropagateNonFinite()([h, x_1, ..., x_k])``, it returns ``h`` with every
    row ``b`` set to NaN for which some ``x_j[b]`` holds a NaN or an infinity (or sums
    to an overflow). Other rows pass unchanged.

    A NaN in an input does not reliably reach a model's output: the fused
    ``MatMul + BiasAdd + Relu`` kernel of oneDNN (TensorFlow's default CPU kernels on
    x86), which Grappler substitutes in graphs, maps NaN to 0, so a sample with a NaN
    feature could come out as a confident-looking prediction, and other runtimes may
    not map it the same way. Placed after an encoder with the encoder's input as a
    source, this layer makes such a sample NaN in every runtime. It adds each source's
    row sum times zero, which is zero for a finite row and NaN otherwise; the ops are a
    sum, a product and an addition, which exist in every runtime the package exports to.

    Input shape:
        A list ``[h, x_1, ..., x_k]`` of ``(batch, d)`` tensors, ``k >= 1``.

    Output shape:
        ``h``'s shape.

    Example:

    >>> import numpy as np
    >>> h = np.ones((2, 3), "float32")
    >>> x = np.array([[1.0, 2.0], [np.nan, 0.0]], "float32")
    >>> PropagateNonFinite()([h, x]).numpy()[:, 0]
    array([ 1., nan], dtype=float32)
    """

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) < 2:
            raise ValueError(
                f"PropagateNonFinite '{self.name}' must be called on a list [h, x_1, ...] "
                f"of at least two tensors; got {input_shape}."
            )
        super().build(input_shape)

    def call(self, inputs):
        h, sources = inputs[0], inputs[1:]
        poison = sum(ops.sum(ops.cast(x, h.dtype), axis=-1, keepdims=True) for x in sources) * 0.0
        return h + poison

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])
