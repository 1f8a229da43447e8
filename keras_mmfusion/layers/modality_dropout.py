"""Modality dropout: whole modalities removed at random in training."""

import keras
from keras import ops

from keras_mmfusion.layers.modality_inputs import check_modality_mask


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ModalityDropout(keras.layers.Layer):
    """A modality presence mask with modalities dropped at random in training.

    Called as ``ModalityDropout(rate)(inputs, modality_mask=None)`` on the list of
    ``N`` modality tensors, it returns a boolean ``(batch, N)`` mask for a fusion
    layer's ``modality_mask``. In training, each modality present in a sample (all,
    without ``modality_mask``) is dropped with probability ``rate``, except that one
    present modality per sample, picked uniformly at random, always stays, so no
    sample is left empty. Outside training it returns ``modality_mask`` unchanged
    (all True without one).

    Trained this way, a fusion model learns to predict from any subset of its
    modalities, as in modality dropout for multimodal networks (Neverova et al.,
    ModDrop, 2015).

    Args:
        rate: the probability, in ``[0, 1)``, of dropping each present modality.
        seed: seed of the draws.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 1`` tensors ``(batch, d_i)``; optionally ``modality_mask``,
        boolean ``(batch, N)``.

    Output shape:
        ``(batch, N)``, boolean.

    Example:

    >>> import numpy as np
    >>> x = [np.ones((4, 2)), np.ones((4, 3))]
    >>> mask = ModalityDropout(0.5, seed=1)(x, training=True)
    >>> bool(mask.numpy().any(axis=1).all())
    True
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"rate must be a number in [0, 1), got {rate!r}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, modality_mask=None, training=None):
        inputs = list(inputs)
        count = len(inputs)
        shape = (ops.shape(inputs[0])[0], count)
        if modality_mask is None:
            mask = ops.ones(shape, dtype="bool")
        else:
            mask = check_modality_mask(f"ModalityDropout '{self.name}'", modality_mask, count)
        if not training or self.rate == 0:
            return mask
        draws = keras.random.uniform(shape, seed=self.seed_generator)
        # The present modality with the largest draw is uniformly random among them.
        kept = ops.one_hot(ops.argmax(ops.where(mask, draws, -1.0), axis=-1), count, dtype="bool")
        return ops.logical_and(mask, ops.logical_or(draws >= self.rate, kept))

    def compute_output_shape(self, input_shape):
        return (tuple(input_shape[0])[0], len(input_shape))

    def compute_output_spec(self, inputs, modality_mask=None, training=None):
        return keras.KerasTensor((inputs[0].shape[0], len(inputs)), dtype="bool")

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
