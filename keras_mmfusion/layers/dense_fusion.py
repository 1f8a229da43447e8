"""Dense multimodal fusion (Hu et al., "Dense Multimodal Fusion for Hierarchically
Joint Representation", arXiv 1810.03414)."""

import keras
from keras import ops

from keras_mmfusion.layers.fusion_layer import FusionLayer
from keras_mmfusion._checks import check_int, check_units


def _per_level(name, value, depth):
    """``value`` as a list of ``depth`` positive ints (one int is repeated)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} must be one int or a list of depth={depth} ints, got {value!r}.")
    for v in values:
        check_units(v, allow_none=False)
    return values


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class DenseFusion(FusionLayer):
    """Dense multimodal fusion (DMF): shared layers stacked between modality stacks.

    Each modality ``i`` has a stack of ``depth`` layers
    ``h_i^l = act(W_i^l h_i^(l-1))`` with ``h_i^0 = x_i``. Shared layer ``l`` reads
    level ``l`` of every modality and the shared layer below it:
    ``s^l = act(sum_i U_i^l h_i^l + V^l s^(l-1) + b^l)``; the first shared layer has no
    ``s^0`` term. The layer returns ``s^depth``, or ``[s^1, ..., s^depth]`` when
    ``return_all_levels=True``.

    With ``modality_mask``, an absent modality's ``h_i^l`` is zero at every level, so
    the shared layers read the present modalities only.

    Args:
        units: the shared width (of every ``s^l``).
        depth: the number of levels ``L``.
        modality_units: the width of the modality stacks: one int, or a list with
            one int per level. ``None`` uses ``units``.
        activation: the activation ``act``.
        dropout: dropout rate applied to every ``h_i^l`` and ``s^l`` in training.
        normalization: ``None`` or ``"layer"`` (LayerNorm before each activation).
        return_all_levels: return every shared level instead of the top one.
        seed: seed of the dropout.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``, or a list of ``depth`` such tensors.

    Example:

    >>> import numpy as np
    >>> tuple(DenseFusion(8, depth=2)([np.ones((2, 3)), np.ones((2, 5))]).shape)
    (2, 8)
    """

    def __init__(
        self,
        units,
        depth=2,
        modality_units=None,
        activation="relu",
        dropout=0.0,
        normalization=None,
        return_all_levels=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_units(units, allow_none=False)
        check_int("depth", depth)
        self.modality_levels = _per_level(
            "modality_units", units if modality_units is None else modality_units, depth
        )
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if normalization not in (None, "layer"):
            raise ValueError(f"normalization must be None or 'layer', got {normalization!r}.")
        self.units = units
        self.depth = depth
        self.modality_units = modality_units
        self.activation = keras.activations.get(activation)
        self.dropout = dropout
        self.normalization = normalization
        self.return_all_levels = bool(return_all_levels)
        self.seed = seed
        self.dropout_layer = keras.layers.Dropout(dropout, seed=seed) if dropout > 0 else None

    def _norm(self, name, width):
        if self.normalization is None:
            return None
        norm = keras.layers.LayerNormalization(name=name, dtype=self.dtype_policy)
        norm.build((None, width))
        return norm

    def build_fusion(self, widths):
        self.modality_stacks = []
        self.modality_norms = []
        for i, width in enumerate(widths):
            stack, norms = [], []
            for level, units in enumerate(self.modality_levels, start=1):
                stack.append(self.dense(units, f"modality_{i}_level_{level}", input_width=width))
                norms.append(self._norm(f"modality_{i}_norm_{level}", units))
                width = units
            self.modality_stacks.append(stack)
            self.modality_norms.append(norms)
        # One Dense over the concatenated levels is sum_i U_i^l h_i^l (+ b^l).
        self.shared = [
            self.dense(self.units, f"shared_{level}", input_width=len(widths) * units)
            for level, units in enumerate(self.modality_levels, start=1)
        ]
        self.recurrent = [
            self.dense(self.units, f"shared_{level}_from_below", use_bias=False, input_width=self.units)
            for level in range(2, self.depth + 1)
        ]
        self.shared_norms = [self._norm(f"shared_norm_{level}", self.units) for level in range(1, self.depth + 1)]

    def _activate(self, x, norm, training):
        if norm is not None:
            x = norm(x)
        x = self.activation(x)
        if self.dropout_layer is not None:
            x = self.dropout_layer(x, training=training)
        return x

    def fuse(self, inputs, presence, training):
        states = list(inputs)
        shared = None
        levels = []
        for level in range(self.depth):
            states = [
                self._activate(self.modality_stacks[i][level](h), self.modality_norms[i][level], training)
                for i, h in enumerate(states)
            ]
            if presence is not None:
                states = [h * presence[:, i : i + 1] for i, h in enumerate(states)]
            pre = self.shared[level](ops.concatenate(states, axis=-1))
            if shared is not None:
                pre = pre + self.recurrent[level - 1](shared)
            shared = self._activate(pre, self.shared_norms[level], training)
            levels.append(shared)
        return levels if self.return_all_levels else shared

    def output_width(self, widths):
        return self.units

    def compute_output_shape(self, input_shape):
        shape = super().compute_output_shape(input_shape)
        return [shape] * self.depth if self.return_all_levels else shape

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            depth=self.depth,
            modality_units=list(self.modality_units)
            if isinstance(self.modality_units, (list, tuple))
            else self.modality_units,
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout,
            normalization=self.normalization,
            return_all_levels=self.return_all_levels,
            seed=self.seed,
        )
        return config
