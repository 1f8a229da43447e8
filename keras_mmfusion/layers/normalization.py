"""Group normalisation that differentiates exactly to any order."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ExactGroupNormalization(keras.layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` over the last axis, with exact higher derivatives.

    It takes the same arguments and creates the same weights (``gamma``, ``beta``) as
    Keras's layer, and computes the same function: per sample and group of channels,
    ``(x - mean) / sqrt(var + epsilon) * gamma + beta``. The difference is how the
    moments are differentiated. On TensorFlow, Keras computes them with
    ``tf.nn.moments``, which takes the variance around ``stop_gradient(mean)``. That
    leaves first derivatives exact (the variance's derivative through the mean is zero
    at the mean) but drops terms from second derivatives. A loss that differentiates a
    Jacobian, such as the Jacobian penalty of an equilibrium model, then gets a wrong
    gradient. Here the variance is the mean of ``square(x - mean)`` with the mean left
    on the tape, so every order of derivative is exact.

    The moments are computed in float32 for float16 and bfloat16 inputs (float64 for
    float64). A group whose variance overflows gives NaN, not zeros. The ops are
    elementwise arithmetic, means, ``rsqrt`` and a select, which have TFLite builtins
    and ONNX counterparts and compile under XLA.

    Args:
        groups: the number of groups; the last axis must be divisible by it.
        axis: must be -1 (or the last axis' index), the channel axis.
        epsilon, center, scale, and the initializers, regularizers and constraints of
            ``beta`` and ``gamma``: as for ``keras.layers.GroupNormalization``.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        ``(batch, ..., channels)``.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> y = ExactGroupNormalization(groups=2)(np.arange(8.0).reshape(2, 4))
    >>> tuple(y.shape)
    (2, 4)
    """

    def build(self, input_shape):
        rank = len(input_shape)
        if self.axis not in (-1, rank - 1):
            raise ValueError(
                f"ExactGroupNormalization '{self.name}' normalises the last axis; "
                f"got axis={self.axis} for inputs of rank {rank}."
            )
        super().build(input_shape)

    def call(self, inputs):
        channels = inputs.shape[-1]
        dtype = "float64" if keras.backend.standardize_dtype(inputs.dtype) == "float64" else "float32"
        x = ops.cast(inputs, dtype)
        if self.groups == 1:
            # One group: the moments over every non-batch axis, with no reshape (a
            # DEQ update holds several of these inside its solver loop, so the ops
            # saved are saved at every iteration of an exported model).
            grouped, axes = x, tuple(range(1, len(x.shape)))
        else:
            grouped, axes = ops.reshape(x, (ops.shape(x)[0], -1, self.groups, channels // self.groups)), (1, 3)
        mean = ops.mean(grouped, axis=axes, keepdims=True)
        centered = grouped - mean
        variance = ops.mean(ops.square(centered), axis=axes, keepdims=True)
        # A variance that overflows (inputs near sqrt of the dtype's largest value)
        # would scale the group to zero and pass for a normalised output; NaN says
        # that it could not be computed.
        inv = ops.where(ops.isfinite(variance), ops.rsqrt(variance + self.epsilon), float("nan"))
        normalized = centered * inv if self.groups == 1 else ops.reshape(centered * inv, ops.shape(x))
        if self.scale:
            normalized = normalized * ops.cast(self.gamma, dtype)
        if self.center:
            normalized = normalized + ops.cast(self.beta, dtype)
        return ops.cast(normalized, self.compute_dtype)
