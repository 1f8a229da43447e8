"""A Dense layer with weight normalisation (Salimans & Kingma, 2016)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class WeightNormalizedDense(keras.layers.Dense):
    """``keras.layers.Dense`` whose kernel is ``scale * v / ||v||``, one norm per output unit.

    Weight normalisation (Salimans & Kingma, 2016) splits every column of the kernel into
    a direction ``v`` (the ``kernel`` variable) and a length (the ``scale`` variable, one
    per output unit), and trains both. The layer computes ``activation(x @ W + bias)`` with
    ``W[:, j] = scale[j] * v[:, j] / ||v[:, j]||``. ``scale`` starts at the norms of the
    initial columns, so a new layer computes what ``Dense`` computes with the same
    initial kernel. Equilibrium models use it to keep the size of the update's weights a
    trained quantity of its own (TorchDEQ applies it to the update's layers by default);
    see ``DEQFusion(kernel_normalization="weight")``.

    The norms are computed in float32 under a mixed precision policy (float64 for
    float64 layers); the ops are elementwise arithmetic, a sum and a square root, which
    have TFLite builtins and ONNX counterparts and compile under XLA. A kernel column of
    zeros has no direction: its output is NaN.

    Args:
        units, activation, use_bias, and the initializers, regularizers and constraints:
            as for ``keras.layers.Dense``; those of the kernel apply to the direction ``v``.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        ``(batch, ..., input_dim)``.

    Output shape:
        ``(batch, ..., units)``.

    Example:

    >>> import numpy as np
    >>> y = WeightNormalizedDense(3)(np.ones((2, 4)))
    >>> tuple(y.shape)
    (2, 3)
    """

    def build(self, input_shape):
        if self.lora_rank or self.quantization_mode:
            raise ValueError(
                f"WeightNormalizedDense '{self.name}' supports neither LoRA nor quantization "
                f"(got lora_rank={self.lora_rank!r}, quantization_mode={self.quantization_mode!r})."
            )
        super().build(input_shape)
        direction = self._kernel
        self.scale = self.add_weight(
            name="scale",
            shape=(self.units,),
            initializer=lambda shape, dtype=None: ops.cast(_column_norms(direction), dtype or direction.dtype),
        )

    # Dense saves and loads its kernel and bias by name (and its quantization variables);
    # the base Layer's methods store every variable of the layer, ``scale`` included.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def call(self, inputs, training=None):
        dtype = "float64" if keras.backend.standardize_dtype(self.variable_dtype) == "float64" else "float32"
        direction = ops.cast(self._kernel.value, dtype)
        kernel = direction * (ops.cast(self.scale.value, dtype) / _column_norms(direction))
        x = ops.matmul(inputs, ops.cast(kernel, self.compute_dtype))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _column_norms(kernel):
    return ops.sqrt(ops.sum(ops.square(kernel), axis=0))
