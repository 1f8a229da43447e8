"""The base class of the list-of-modalities fusion layers.

It holds what every fusion layer shares: checking the modality list at build and call
time, the Dense sub-layers they build with common initializers and regularizers, and
the ``get_config`` entries for those.
"""

import keras

from keras_mmfusion.layers.modality_inputs import check_modalities, modality_widths
from keras_mmfusion.layers.modality_mask import masked_inputs


def check_units(units, allow_none=True):
    """Raise a ``ValueError`` unless ``units`` is a positive int (or ``None``)."""
    if units is None and allow_none:
        return
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        expected = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"units must be {expected}, got {units!r}.")


class FusionLayer(keras.layers.Layer):
    """A layer called on a list of ``N >= 2`` modality tensors ``(batch, d_i)``.

    Subclasses implement ``build_fusion(widths)``, ``fuse(inputs, presence, training)``
    and ``output_width(widths)``; this class validates the inputs and names the
    offending one in every error.

    Called as ``layer(inputs, modality_mask=mask)``, with ``mask`` a boolean
    ``(batch, N)`` tensor (True where a modality is present), the layer zeroes every
    absent modality's inputs and passes ``fuse`` the mask as 0/1 ``presence`` weights
    of the compute dtype, ``(batch, N)``; without a mask ``presence`` is ``None``. A
    sample with no modality present is refused (see
    :func:`~keras_mmfusion.layers.modality_mask.require_present`).

    Args:
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer:
            used by every Dense sub-layer the subclass makes with :meth:`dense`.
        **kwargs: base ``Layer`` arguments.
    """

    def __init__(
        self,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    @property
    def label(self):
        return f"{type(self).__name__} '{self.name}'"

    def dense(self, units, name, activation=None, use_bias=True, input_width=None):
        """A Dense sub-layer with this layer's initializers; built when ``input_width`` is given."""
        layer = keras.layers.Dense(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            dtype=self.dtype_policy,
            name=name,
        )
        if input_width is not None:
            layer.build((None, input_width))
        return layer

    def build(self, input_shape):
        self._widths = modality_widths(self.label, input_shape)
        self.build_fusion(list(self._widths))

    def call(self, inputs, modality_mask=None, training=None):
        check_modalities(self.label, inputs, self._widths)
        inputs, presence = masked_inputs(self.label, list(inputs), modality_mask, self.compute_dtype)
        return self.fuse(inputs, presence, training)

    def compute_output_shape(self, input_shape):
        widths = modality_widths(self.label, input_shape)
        return (tuple(input_shape[0])[0], self.output_width(widths))

    def build_fusion(self, widths):
        raise NotImplementedError

    def fuse(self, inputs, presence, training):
        raise NotImplementedError

    def output_width(self, widths):
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config

