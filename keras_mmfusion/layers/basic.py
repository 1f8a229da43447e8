"""The standard fusion baselines: concat, sum/mean, gated (GMU), TFN and LMF."""

import math

import keras
from keras import ops

from keras_mmfusion.layers.fusion_layer import FusionLayer
from keras_mmfusion.layers.modality_mask import masked_logits
from keras_mmfusion._checks import check_int, check_units


def _append_one(x):
    """``[x, 1]`` along the last axis, the affine extension used by TFN and LMF."""
    return ops.concatenate([x, ops.ones_like(x[:, :1])], axis=-1)


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ConcatFusion(FusionLayer):
    """Concatenation of the modalities, optionally followed by a Dense projection.

    With ``modality_mask``, an absent modality's slice of the concatenation is zero,
    so it adds nothing to the projection.

    Args:
        units: width of the projection; ``None`` returns the plain concatenation.
        activation: activation of the projection (ignored when ``units`` is None).
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``, or ``(batch, sum_i d_i)`` when ``units`` is None.

    Example:

    >>> import numpy as np
    >>> tuple(ConcatFusion()([np.ones((2, 3)), np.ones((2, 5))]).shape)
    (2, 8)
    """

    def __init__(self, units=None, activation=None, **kwargs):
        super().__init__(**kwargs)
        check_units(units)
        self.units = units
        self.activation = keras.activations.get(activation)

    def build_fusion(self, widths):
        self.projection = None
        if self.units is not None:
            self.projection = self.dense(self.units, "projection", self.activation, input_width=sum(widths))

    def fuse(self, inputs, presence, training):
        fused = ops.concatenate(inputs, axis=-1)
        return fused if self.projection is None else self.projection(fused)

    def output_width(self, widths):
        return sum(widths) if self.units is None else self.units

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, activation=keras.activations.serialize(self.activation))
        return config


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class SumFusion(FusionLayer):
    """Projects every modality to ``units`` and sums (or averages) the projections.

    With ``modality_mask``, the sum runs over the present modalities' projections
    (biases included), and the mean divides by the number present.

    Args:
        units: the common width. ``None`` skips the projections, and then every input
            must have the same width.
        mode: ``"sum"`` or ``"mean"``.
        activation: applied after the sum.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)`` (``(batch, d)`` when ``units`` is None).

    Example:

    >>> import numpy as np
    >>> tuple(SumFusion(4, mode="mean")([np.ones((2, 3)), np.ones((2, 5))]).shape)
    (2, 4)
    """

    def __init__(self, units=None, mode="sum", activation=None, **kwargs):
        super().__init__(**kwargs)
        check_units(units)
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}.")
        self.units = units
        self.mode = mode
        self.activation = keras.activations.get(activation)

    def build_fusion(self, widths):
        if self.units is None and len(set(widths)) != 1:
            raise ValueError(
                f"{self.label}: the input widths {widths} differ, so units=None cannot "
                "sum them; pass units=... to project every input to a common width."
            )
        self.projections = [
            None if self.units is None else self.dense(self.units, f"projection_{i}", input_width=w)
            for i, w in enumerate(widths)
        ]

    def fuse(self, inputs, presence, training):
        parts = [x if p is None else p(x) for x, p in zip(inputs, self.projections)]
        if presence is not None:
            parts = [part * presence[:, i : i + 1] for i, part in enumerate(parts)]
        fused = ops.sum(ops.stack(parts), axis=0)
        if self.mode == "mean":
            count = len(parts) if presence is None else ops.maximum(ops.sum(presence, axis=1, keepdims=True), 1)
            fused = fused / count
        return self.activation(fused)

    def output_width(self, widths):
        return widths[0] if self.units is None else self.units

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, mode=self.mode, activation=keras.activations.serialize(self.activation)
        )
        return config


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class GatedFusion(FusionLayer):
    """Gated multimodal unit (Arevalo et al., 2017) generalised to N modalities.

    Each modality gives a candidate ``h_i = tanh(W_i x_i)``. A gate reads all inputs,
    ``g = softmax_i(W_g [x_1, ..., x_N])`` with one weight per modality and unit, and
    the output is ``sum_i g_i * h_i``. For two modalities this is the GMU's
    ``z * h_1 + (1 - z) * h_2`` with ``z = sigmoid(.)``.

    With ``modality_mask``, the softmax runs over the present modalities only: an
    absent modality's gate entries are 0, and the gate reads zeros for its inputs.

    Args:
        units: the output width.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``.

    Example:

    >>> import numpy as np
    >>> tuple(GatedFusion(4)([np.ones((2, 3)), np.ones((2, 5))]).shape)
    (2, 4)
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        check_units(units, allow_none=False)
        self.units = units

    def build_fusion(self, widths):
        self.candidates = [
            self.dense(self.units, f"candidate_{i}", "tanh", input_width=w) for i, w in enumerate(widths)
        ]
        self.gate = self.dense(len(widths) * self.units, "gate", input_width=sum(widths))

    def fuse(self, inputs, presence, training):
        logits = self.gate(ops.concatenate(inputs, axis=-1))
        logits = ops.reshape(logits, (-1, len(inputs), self.units))
        if presence is not None:
            logits = masked_logits(logits, presence[:, :, None] > 0)
        gates = ops.softmax(logits, axis=1)
        candidates = ops.stack([c(x) for c, x in zip(self.candidates, inputs)], axis=1)
        return ops.sum(gates * candidates, axis=1)

    def output_width(self, widths):
        return self.units

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class TensorFusion(FusionLayer):
    """Tensor fusion (Zadeh et al., 2017, TFN): the outer product of ``[x_i, 1]``.

    The fused vector holds every product of one entry per modality (including the
    appended 1, so it also holds every lower-order interaction and the inputs
    themselves). Its width is ``prod_i (d_i + 1)``. An optional Dense projection maps
    it to ``units``.

    The width grows multiplicatively, so a configuration whose fused width exceeds
    ``max_fused_width`` (default 2**20 values per sample, 4 MiB in float32) is
    refused at build time with a ``ValueError`` that names the alternatives: smaller
    input widths, :class:`LowRankTensorFusion` (which never forms the outer product),
    or a larger ``max_fused_width``.

    With ``modality_mask``, an absent modality's entries are zero and its appended 1
    stays, so the fused vector holds the interactions among the present modalities
    only: the tensor fusion of the present modalities, in the same positions.

    Args:
        units: width of the projection; ``None`` returns the fused tensor flattened.
        activation: activation of the projection.
        max_fused_width: the largest ``prod_i (d_i + 1)`` accepted.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``, or ``(batch, prod_i (d_i + 1))`` when ``units`` is None.

    Example:

    >>> import numpy as np
    >>> tuple(TensorFusion()([np.ones((2, 3)), np.ones((2, 4))]).shape)
    (2, 20)
    """

    def __init__(self, units=None, activation=None, max_fused_width=2**20, **kwargs):
        super().__init__(**kwargs)
        check_units(units)
        check_int("max_fused_width", max_fused_width)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.max_fused_width = max_fused_width

    def build_fusion(self, widths):
        fused = math.prod(w + 1 for w in widths)
        if fused > self.max_fused_width:
            raise ValueError(
                f"{self.label}: the fused width prod(d_i + 1) for input widths {widths} is "
                f"{fused}, above max_fused_width={self.max_fused_width}. Project the "
                "inputs to smaller widths, use LowRankTensorFusion, or raise "
                "max_fused_width."
            )
        self.projection = None
        if self.units is not None:
            self.projection = self.dense(self.units, "projection", self.activation, input_width=fused)

    def fuse(self, inputs, presence, training):
        fused = _append_one(inputs[0])
        for x in inputs[1:]:
            x = _append_one(x)
            fused = ops.reshape(fused[:, :, None] * x[:, None, :], (-1, fused.shape[-1] * x.shape[-1]))
        return fused if self.projection is None else self.projection(fused)

    def output_width(self, widths):
        return math.prod(w + 1 for w in widths) if self.units is None else self.units

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=keras.activations.serialize(self.activation),
            max_fused_width=self.max_fused_width,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class LowRankTensorFusion(FusionLayer):
    """Low-rank multimodal fusion (Liu et al., 2018, LMF).

    Equal to :class:`TensorFusion` followed by a Dense layer whose weight tensor is
    the rank-``R`` sum ``W = sum_r lambda_r (W_1^r (x) ... (x) W_N^r)``, computed
    without forming the outer product:
    ``y = sum_r lambda_r prod_i ([x_i, 1] W_i^r) + b``.

    With ``modality_mask``, an absent modality enters as ``[0, 1]``, so its factor is
    the row ``W_i^r[-1]`` for every sample: as in :class:`TensorFusion`, only the
    present modalities' interactions remain.

    Args:
        units: the output width.
        rank: the number of rank-one terms R.
        activation: applied to ``y``.
        **kwargs: initializers, regularizers and base ``Layer`` arguments.

    Input shape:
        A list of ``N >= 2`` tensors ``(batch, d_i)``; optionally
        ``modality_mask``, boolean ``(batch, N)``.

    Output shape:
        ``(batch, units)``.

    Example:

    >>> import numpy as np
    >>> tuple(LowRankTensorFusion(4, rank=2)([np.ones((2, 3)), np.ones((2, 5))]).shape)
    (2, 4)
    """

    def __init__(self, units, rank=4, activation=None, **kwargs):
        super().__init__(**kwargs)
        check_units(units, allow_none=False)
        check_int("rank", rank)
        self.units = units
        self.rank = rank
        self.activation = keras.activations.get(activation)

    def build_fusion(self, widths):
        self.factors = [
            self.add_weight(
                shape=(self.rank, w + 1, self.units),
                initializer=self.initializer(self.kernel_initializer),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
                name=f"factor_{i}",
            )
            for i, w in enumerate(widths)
        ]
        self.rank_weights = self.add_weight(
            shape=(self.rank,), initializer="glorot_uniform", name="rank_weights"
        )
        self.bias = self.add_weight(
            shape=(self.units,),
            initializer=self.initializer(self.bias_initializer),
            regularizer=self.bias_regularizer,
            constraint=self.bias_constraint,
            name="bias",
        )

    def fuse(self, inputs, presence, training):
        product = None
        for x, factor in zip(inputs, self.factors):
            term = ops.einsum("bd,rdu->bru", _append_one(x), ops.cast(factor, x.dtype))
            product = term if product is None else product * term
        weights = ops.cast(self.rank_weights, product.dtype)
        return self.activation(ops.einsum("bru,r->bu", product, weights) + ops.cast(self.bias, product.dtype))

    def output_width(self, widths):
        return self.units

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, rank=self.rank, activation=keras.activations.serialize(self.activation)
        )
        return config
