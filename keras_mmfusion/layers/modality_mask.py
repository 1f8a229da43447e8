"""The per-sample modality presence mask every fusion layer accepts.

A fusion layer called as ``layer(inputs, modality_mask=mask)`` reads ``mask``, a boolean
``(batch, num_modalities)`` tensor, as "modality ``i`` of sample ``b`` is present". An
absent modality contributes nothing: its input values are replaced by zeros before any
op reads them (so a NaN standing in for a missing view does no harm), and each layer
then leaves the modality out of what it combines, as its docstring describes.

These helpers turn the mask (checked by
:func:`~keras_mmfusion.layers.modality_inputs.check_modality_mask`) into the float presence weights the layers
multiply with, and refuse samples that have no modality at all.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_mmfusion.layers.modality_inputs import check_modality_mask


def require_present(label, mask, needed="at least one modality present in modality_mask"):
    """Refuse samples whose row of ``mask`` has no True entry.

    Called eagerly, it raises a ``ValueError`` listing the samples. Inside a traced
    function (``model.fit``, ``predict``) it adds an assertion op, which raises
    ``tf.errors.InvalidArgumentError`` with the same message when it runs. XLA and the
    TFLite and ONNX runtimes drop assertion ops; there such a sample gets the layer's
    output for no evidence, which is finite.
    """
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    message = f"{label}: every sample needs {needed}"
    if tf.executing_eagerly():
        empty = np.flatnonzero(count.numpy() == 0)
        if empty.size:
            raise ValueError(f"{message}; samples {empty[:10].tolist()} have none.")
        return mask
    with tf.control_dependencies([tf.debugging.assert_positive(count, message=message)]):
        return tf.identity(mask)


def masked_inputs(label, inputs, modality_mask, dtype):
    """What a fusion layer combines under ``modality_mask``: ``(inputs, presence)``.

    The mask is checked against ``inputs``, a sample with no modality is refused, the
    absent modalities' inputs are zeroed, and ``presence`` is the mask as 0/1 weights
    of ``dtype``. Without a mask, ``(inputs, None)``.
    """
    if modality_mask is None:
        return inputs, None
    mask = check_modality_mask(label, modality_mask, len(inputs), inputs[0].shape[0])
    mask = require_present(label, mask)
    return zero_absent(inputs, mask), presence_weights(mask, dtype)


def zero_absent(inputs, mask):
    """``inputs`` with every absent modality's rows replaced by zeros (``where``, not a
    product, so that NaN or infinite placeholders vanish too)."""
    return [
        ops.where(mask[:, i : i + 1], x, ops.zeros_like(x)) for i, x in enumerate(inputs)
    ]


def presence_weights(mask, dtype):
    """The mask as ``(batch, num_modalities)`` 0/1 weights of ``dtype``."""
    return ops.cast(mask, dtype)


def masked_logits(logits, present):
    """``logits`` with the entries where ``present`` is False set to the dtype's lowest
    finite value, so that a softmax gives them weight 0 (and a row with no entry
    present stays finite)."""
    lowest = ops.cast(tf.as_dtype(logits.dtype).min, logits.dtype)
    return ops.where(present, logits, lowest)


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ZeroAbsent(keras.layers.Layer):
    """Replace every absent modality's rows by zeros, ahead of the layers that read them.

    Called as ``ZeroAbsent()(inputs, modality_mask=mask)`` on a list of ``N`` tensors
    ``(batch, d_i)`` and a boolean ``(batch, N)`` mask, it returns the list with row
    ``b`` of input ``i`` set to zeros wherever ``mask[b, i]`` is False. A model that
    marks missing views with NaN puts it first, so that standardisation, encoders and
    non-finite checks see finite placeholders; the fusion layer then leaves the
    modality out.

    Example:

    >>> import numpy as np
    >>> x = [np.ones((2, 2), "float32"), np.full((2, 3), np.nan, "float32")]
    >>> out = ZeroAbsent()(x, modality_mask=np.array([[True, False], [True, False]]))
    >>> out[1].numpy().tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def call(self, inputs, modality_mask):
        mask = check_modality_mask(f"ZeroAbsent '{self.name}'", modality_mask, len(inputs))
        return zero_absent(list(inputs), mask)

    def compute_output_shape(self, input_shape):
        return [tuple(s) for s in input_shape]
