"""Feature-informativeness gates (Han et al., "Multimodal Dynamics", CVPR 2022)."""

import keras
from keras import ops

from keras_mmfusion.equilibrium.iteration import internal_dtype
from keras_mmfusion._checks import check_non_negative


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class FeatureGate(keras.layers.Layer):
    """``x * sigmoid(W x + b)``: a learned per-sample weight in ``(0, 1)`` on every feature.

    In training calls the mean gate value times ``sparsity_weight`` is added to the loss
    (``add_loss``), which pushes uninformative features' gates towards zero, as in
    Multimodal Dynamics. The mean gate value is logged by ``fit``/``evaluate`` as
    ``<name>_sparsity``.

    Args:
        sparsity_weight: weight of the mean gate value in the loss; 0 disables it.
        kernel_initializer: initializer of ``W`` (Glorot normal, as in the reference code).
        **kwargs: base ``Layer`` arguments.

    Input shape:
        ``(batch, features)``.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> FeatureGate()(np.ones((2, 5), "float32")).shape
    TensorShape([2, 5])
    """

    def __init__(self, sparsity_weight=1.0, kernel_initializer="glorot_normal", **kwargs):
        super().__init__(**kwargs)
        check_non_negative("sparsity_weight", sparsity_weight)
        self.sparsity_weight = sparsity_weight
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.sparsity = keras.metrics.Mean(name=f"{self.name}_sparsity")

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"FeatureGate '{self.name}' gates the features of (batch, features) inputs; got an "
                f"input of shape {tuple(input_shape)}."
            )
        self.dense = keras.layers.Dense(
            input_shape[-1], kernel_initializer=self.kernel_initializer, name="gate", dtype=self.dtype_policy
        )
        self.dense.build(input_shape)

    def call(self, x, training=None):
        gate = ops.sigmoid(self.dense(x))
        mean_gate = ops.mean(ops.cast(gate, internal_dtype(self.compute_dtype)))
        self.sparsity.update_state(mean_gate)
        if training and self.sparsity_weight > 0:
            self.add_loss(self.sparsity_weight * mean_gate)
        return x * gate

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            sparsity_weight=self.sparsity_weight,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
