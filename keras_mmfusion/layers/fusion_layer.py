"""The base class of the list-of-modalities fusion layers.

It holds what every fusion layer shares: checking the modality list at build and call
time, the Dense sub-layers they build with common initializers and regularizers, and
the ``get_config`` entries for those.
"""

import keras

from keras_mmfusion.layers.modality_inputs import check_modalities, modality_widths
from keras_mmfusion.layers.modality_mask import masked_inputs


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
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
            kernel_constraint, bias_constraint: as ``keras.layers.Dense``'s, used by
            every Dense sub-layer the subclass makes with :meth:`dense`. Each
            sub-layer's weights are drawn independently (see :meth:`initializer`).
        **kwargs: base ``Layer`` arguments.
    """

    def __init__(
        self,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self._seeded_copies = 0  # seeded initializer copies made by initializer()

    def initializer(self, initializer):
        """An independent copy of ``initializer`` for one weight of this layer.

        A Keras initializer object draws the same values at every call of the same
        shape (an unseeded one fixes its seed when it is made), so one object shared by
        several sub-layers would start them all equal: every modality block of a fusion
        layer, say, with the same kernel. Each call returns a new object: an unseeded
        initializer's copy draws its own seed (reproducible after
        ``keras.utils.set_random_seed``); a seeded one's copy is seeded with its seed plus
        the number of copies this layer has made before, so the layer's draws are
        reproducible and still differ between its weights. Initializers without a seed
        (zeros, constants) are returned as they are.
        """
        initializer = keras.initializers.get(initializer)
        config = initializer.get_config()
        if "seed" not in config:
            return initializer
        if isinstance(config["seed"], int):
            config["seed"] += self._seeded_copies
            self._seeded_copies += 1
        return type(initializer).from_config(config)

    @property
    def label(self):
        return f"{type(self).__name__} '{self.name}'"

    def dense(
        self, units, name, activation=None, use_bias=True, input_width=None, kernel_initializer=None,
        layer_class=keras.layers.Dense,
    ):
        """A ``layer_class`` (a ``Dense`` or a subclass) sub-layer with this layer's
        initializers, regularizers and constraints; ``kernel_initializer`` replaces the
        layer's own for this sub-layer. Built when ``input_width`` is given."""
        layer = layer_class(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=self.initializer(kernel_initializer or self.kernel_initializer),
            bias_initializer=self.initializer(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
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
        return self.fuse(*self.checked_inputs(inputs, modality_mask), training)

    def checked_inputs(self, inputs, modality_mask=None):
        """``(inputs, presence)`` as :meth:`fuse` receives them: the modality list checked
        against the built widths, absent modalities zeroed, ``presence`` from the mask."""
        check_modalities(self.label, inputs, self._widths)
        return masked_inputs(self.label, list(inputs), modality_mask, self.compute_dtype)

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
            kernel_constraint=keras.constraints.serialize(self.kernel_constraint),
            bias_constraint=keras.constraints.serialize(self.bias_constraint),
        )
        return config

