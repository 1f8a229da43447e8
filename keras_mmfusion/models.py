"""Ready-made classifiers around a fusion layer, and fusion layers by short name.

The examples, the benchmarks and the ``mmfusion`` command build their models here, so
every fusion method is compared inside the same encoder and head.
"""

import keras
import numpy as np

from keras_mmfusion.layers import (
    ConcatFusion,
    ConfidenceHead,
    DEQFusion,
    DenseFusion,
    DynamicFusion,
    FeatureGate,
    GatedFusion,
    LowRankTensorFusion,
    ModalityDropout,
    PropagateNonFinite,
    SumFusion,
    TensorFusion,
    ZeroAbsent,
    training_labels,
)
from keras_mmfusion._checks import check_int


def _deq(units, **kwargs):
    # Every other argument keeps DEQFusion's own default, the one place they are set.
    return DEQFusion(units=units, **kwargs)


def _dynmm(units, num_modalities=None, **kwargs):
    """A cheap expert on modality 0 against all modalities through DenseFusion."""
    if not num_modalities:
        raise ValueError("The dynmm fusion needs num_modalities to build its experts.")
    cheap = keras.layers.Dense(units, activation="relu", name="cheap_expert")
    full = DenseFusion(units, depth=2, name="full_expert")
    options = dict(expert_inputs=[[0], list(range(num_modalities))], cost_weight=0.05, temperature=1.0)
    options.update(kwargs)
    return DynamicFusion([cheap, full], **options)


FUSIONS = {
    "concat": lambda units, **kw: ConcatFusion(units, activation="relu", **kw),
    "sum": lambda units, **kw: SumFusion(units, activation="relu", **kw),
    "gated": lambda units, **kw: GatedFusion(units, **kw),
    "tensor": lambda units, **kw: TensorFusion(units, activation="relu", **kw),
    "lowrank": lambda units, **kw: LowRankTensorFusion(units, activation="relu", **kw),
    "dmf": lambda units, **kw: DenseFusion(units, **{"depth": 2, **kw}),
    "deq": _deq,
    "dynmm": _dynmm,
}


def fusion_names():
    """The short names :func:`make_fusion` accepts."""
    return sorted(FUSIONS)


def make_fusion(name, units, num_modalities=None, **kwargs):
    """A fusion layer by short name (``"deq"``, ``"dmf"``, ``"dynmm"``, ``"concat"``, ...).

    ``num_modalities`` is needed by ``"dynmm"`` only; ``kwargs`` override the defaults
    of that layer's constructor.
    """
    if name not in FUSIONS:
        raise ValueError(f"Unknown fusion {name!r}; expected one of {fusion_names()}.")
    if name == "dynmm":
        kwargs["num_modalities"] = num_modalities
    try:
        return FUSIONS[name](units, name=f"{name}_fusion", **kwargs)
    except TypeError as error:  # e.g. an argument that make_fusion itself sets for this fusion
        raise ValueError(f"make_fusion({name!r}) with {sorted(kwargs)}: {error}") from None


SCALINGS = ("standardize", "min_max")


def _head_dtype():
    """The softmax heads' dtype: float32 (also under mixed precision, for a stable
    softmax and loss); float64 when the float type or the global dtype policy is float64."""
    float64 = "float64" in (keras.config.floatx(), keras.config.dtype_policy().compute_dtype)
    return "float64" if float64 else "float32"


def _modality_inputs(input_widths, input_names, standardize_with, mask=None, scaling="standardize"):
    """The ``keras.Input`` of every modality, what non-finite checks read, and what
    each encoder reads.

    The checks read each input, or with ``mask`` the inputs through
    :class:`ZeroAbsent` (``zero_absent``), so that an absent modality's placeholder
    values reach nothing. The encoders read those, or with ``standardize_with`` (one
    training array per modality) those through a ``keras.layers.Normalization`` made
    from that array: ``standardize_<i>``, adapted to its per-feature mean and variance,
    or with ``scaling="min_max"`` ``min_max_<i>``, which maps its per-feature minimum
    to 0 and maximum to 1.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")
    names = input_names or [f"modality_{i}" for i in range(len(input_widths))]
    inputs = [keras.Input((w,), name=n) for w, n in zip(input_widths, names)]
    # In float32 (the inputs' dtype) under any policy, so that the non-finite checks see the inputs as given.
    present = list(inputs) if mask is None else ZeroAbsent(name="zero_absent", dtype="float32")(inputs, modality_mask=mask)
    if standardize_with is None:
        return inputs, present, list(present)
    if len(standardize_with) != len(inputs):
        raise ValueError(f"standardize_with has {len(standardize_with)} arrays; expected one per modality "
                         f"({len(inputs)}).")
    features = []
    for i, x in enumerate(present):
        if scaling == "min_max":
            low = np.min(standardize_with[i], axis=0)
            span = np.max(standardize_with[i], axis=0) - low
            # (x - low) / span; a feature constant in training is only shifted.
            span = np.where(span > 0, span, 1.0)
            norm = keras.layers.Normalization(axis=-1, mean=low, variance=np.square(span), name=f"min_max_{i}")
        else:
            norm = keras.layers.Normalization(axis=-1, name=f"standardize_{i}")
            norm.adapt(standardize_with[i])
        features.append(norm(x))
    return inputs, present, features


def build_classifier(
    fusion,
    input_widths,
    num_classes,
    encoder_units=32,
    head_units=32,
    dropout=0.0,
    input_names=None,
    l2=0.0,
    standardize_with=None,
    modality_mask=False,
    modality_dropout=0.0,
    scaling="standardize",
):
    """``inputs -> [standardise] -> per-modality Dense encoders -> fusion -> Dense head -> softmax``.

    Args:
        fusion: a fusion layer, called on the list of encoded modalities; ``None``
            feeds the single encoded modality straight to the head (a one-modality
            model, for comparison).
        input_widths: the width of every modality.
        num_classes: the number of classes.
        encoder_units: width of each modality's encoder.
        head_units: width of the hidden layer of the head.
        dropout: dropout after the encoders (layers ``encoder_dropout_<i>``) and in the
            head.
        input_names: the ``keras.Input`` names (default ``modality_0``, ...); they
            become the input names of exported models.
        l2: L2 weight decay of the encoders and head.
        standardize_with: optional training arrays, one per modality. Each modality
            then first goes through a ``keras.layers.Normalization`` adapted on its
            array (per-feature mean and variance, stored as weights, so saved and
            exported models carry them). Pass training data only, never test data.
        scaling: how ``standardize_with`` scales the inputs: ``"standardize"``
            (per-feature mean and variance) or ``"min_max"`` (per-feature minimum to 0
            and maximum to 1, as MOGONET and the DEQ-fusion code scale omics views;
            layers ``min_max_<i>``).
        modality_mask: add a last input, ``modality_mask``: boolean ``(batch, N)``,
            True where a modality is present. Absent modalities' values are ignored
            (NaN placeholders included: :class:`~keras_mmfusion.layers.ZeroAbsent`
            replaces them by zeros first), and the fusion layer leaves them out. The
            mask is an input of exported models too.
        modality_dropout: the rate of a
            :class:`~keras_mmfusion.layers.ModalityDropout` (``modality_dropout``) in
            front of the fusion: in training, each present modality of a sample is
            dropped with this probability (one always stays), so that the model learns
            to cope with missing ones. 0 disables it.

    Returns:
        A functional ``keras.Model`` whose output layer is named ``probabilities``.
        Each modality's encoder is the layer ``encoder_<i>``. A sample with a NaN or
        an infinity in any present input gets NaN probabilities (see
        :class:`~keras_mmfusion.layers.PropagateNonFinite`).
    """
    if (modality_mask or modality_dropout) and fusion is None:
        raise ValueError("modality_mask and modality_dropout need a fusion layer; fusion is None.")
    regularizer = keras.regularizers.L2(l2) if l2 else None
    mask = keras.Input((len(input_widths),), dtype="bool", name="modality_mask") if modality_mask else None
    inputs, present, features = _modality_inputs(input_widths, input_names, standardize_with, mask, scaling)
    encoded = []
    for i, (raw, x) in enumerate(zip(present, features)):
        h = keras.layers.Dense(encoder_units, activation="relu", kernel_regularizer=regularizer, name=f"encoder_{i}")(x)
        # A sample with a non-finite input must come out NaN, not as a plausible answer,
        # and the fusion must see it as such (a DEQ solve then reports converged=False).
        h = PropagateNonFinite(name=f"non_finite_{i}")([h, raw])
        if dropout:
            h = keras.layers.Dropout(dropout, name=f"encoder_dropout_{i}")(h)
        encoded.append(h)
    fusion_mask = mask
    if modality_dropout:
        fusion_mask = ModalityDropout(modality_dropout, name="modality_dropout")(encoded, modality_mask=mask)
    if fusion is None:
        fused = encoded[0]
    elif fusion_mask is None:
        fused = fusion(encoded)
    else:
        fused = fusion(encoded, modality_mask=fusion_mask)
    hidden = keras.layers.Dense(head_units, activation="relu", kernel_regularizer=regularizer, name="head")(fused)
    if dropout:
        hidden = keras.layers.Dropout(dropout, name="head_dropout")(hidden)
    # Again after the head's ReLU layer, which maps NaN to 0 in oneDNN's fused
    # kernel: a NaN fused output (a solve that found no finite iterate) stays NaN too.
    hidden = PropagateNonFinite(name="non_finite_head")([hidden, fused, *present])
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype=_head_dtype())(hidden)
    model_inputs = inputs + ([mask] if mask is not None else [])
    return keras.Model(model_inputs if len(model_inputs) > 1 else model_inputs[0], outputs)


def with_modality_heads(classifier):
    """A model that trains ``classifier`` with an extra softmax head on every modality's encoding.

    Deep supervision of the encoders: each modality's encoding must also classify on
    its own, as with the per-modality classifiers of Multimodal Dynamics (Han et al.,
    CVPR 2022). The returned model shares every layer with ``classifier``, so training
    it trains ``classifier``; the heads are for training only, and ``classifier`` is
    the model to evaluate, save and export.

    Args:
        classifier: a multi-modality model from :func:`build_classifier`.

    Returns:
        A functional model with the inputs of ``classifier`` and a dict of outputs:
        ``"probabilities"`` (the classifier's output) and ``"modality_<i>"`` (the head
        on modality ``i``, a ``Dense`` softmax layer named ``modality_head_<i>``).
    """
    count = len([t for t in classifier.inputs if t.name != "modality_mask"])
    if count < 2:
        raise ValueError("with_modality_heads needs a classifier of two or more modalities; "
                         f"this one has {count} input.")
    names = {layer.name for layer in classifier.layers}
    num_classes = classifier.outputs[0].shape[-1]
    heads = {}
    for i in range(count):
        source = next((n for n in (f"encoder_dropout_{i}", f"non_finite_{i}", f"encoder_{i}") if n in names), None)
        if source is None:
            raise ValueError(f"with_modality_heads: the classifier has no layer 'encoder_{i}'; "
                             "expected a model from build_classifier.")
        head = keras.layers.Dense(num_classes, activation="softmax", name=f"modality_head_{i}", dtype=_head_dtype())
        heads[f"modality_{i}"] = head(classifier.get_layer(source).output)
    return keras.Model(classifier.inputs, {"probabilities": classifier.outputs[0], **heads})


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ReferenceClassifier(keras.Model):
    """A functional model whose training step hands the labels to its confidence heads.

    It is built by :func:`build_reference_classifier` and behaves as any functional
    Keras model (``predict``, ``save``/``load_model`` in safe mode, export); its only
    difference is ``train_step``, which runs Keras's own step inside
    :func:`keras_mmfusion.layers.training_labels`, so ``model.fit(x, y)`` trains the
    :class:`~keras_mmfusion.layers.ConfidenceHead` layers with the batch's labels.
    """

    # The signature of a functional model's, so that Keras saves and revives it as one.
    def __init__(self, inputs, outputs, name=None, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

    def train_step(self, data):
        _, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with training_labels(labels):
            return super().train_step(data)


def _per_modality(name, value, count):
    """``value`` as a list of one entry per modality: a number repeated, or a list checked."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries, one per modality was expected: {count}.")
    return list(value)


def build_reference_classifier(
    input_widths,
    num_classes,
    units=300,
    dropout=0.5,
    gate_weight=1.0,
    confidence_weight=1.0,
    fusion_options=None,
    input_names=None,
    standardize_with=None,
    scaling="standardize",
    kernel_initializer="glorot_normal",
):
    """The classifier of DEQ fusion's multi-omics experiments (Ni et al., arXiv 2306.16645).

    Multimodal Dynamics (Han et al., CVPR 2022) with DEQ fusion in place of
    concatenation. Every modality ``i`` goes through a :class:`FeatureGate`
    (``feature_gate_<i>``, whose mean gate value is a sparsity loss), a
    ``Dense(units)`` + ReLU encoder (``encoder_<i>``) and dropout, and a
    :class:`ConfidenceHead` (``confidence_<i>``: a per-modality classifier and a
    true-class-probability confidence that scales the encoding). ``DEQFusion``
    (``deq_fusion``) fuses the scaled encodings; its injected fused input is their sum,
    with trained weights or without (``DEQFusion``'s ``injection``). A linear softmax
    classifier (``probabilities``) reads the fused state.

    Compile it with ``"sparse_categorical_crossentropy"`` and train it with
    ``model.fit(x, y)``: the gates', confidence heads' and DEQ layer's losses are added
    in training, and ``fit`` logs them (``feature_gate_<i>_sparsity``,
    ``confidence_<i>_loss``, ``deq_*``). The model's only output is the class
    probabilities, so it saves and exports like :func:`build_classifier`'s models.

    Args:
        input_widths: the width of every modality (at least two).
        num_classes: the number of classes.
        units: the width of the encoders, and of every DEQ state unless
            ``fusion_options`` sets ``units`` (``DEQFusion`` then projects each
            encoding to that width).
        dropout: dropout after each encoder.
        gate_weight: the weight of each gate's sparsity loss: a number for every
            modality, or a list of one per modality.
        confidence_weight: the weight of each confidence head's loss: a number or a
            list of one per modality.
        fusion_options: keyword arguments for ``DEQFusion`` (its defaults otherwise).
        input_names: the ``keras.Input`` names (default ``modality_0``, ...).
        standardize_with: optional training arrays, one per modality, to scale the
            inputs with (as in :func:`build_classifier`).
        scaling: ``"standardize"`` or ``"min_max"`` (as in :func:`build_classifier`).
        kernel_initializer: initializer of the kernels of the gates, encoders,
            confidence heads and classifier (a name, a config or an initializer; the
            DEQ update's are ``fusion_options``'s). Every layer gets its own copy, so an unseeded
            initializer draws every kernel anew. Glorot normal by default, which Keras
            truncates at two standard deviations; PyTorch's ``xavier_normal_``, which
            the reference code uses, is
            ``VarianceScaling(1.0, "fan_avg", "untruncated_normal")``.

    Returns:
        A :class:`ReferenceClassifier`.
    """
    check_int("units", units)
    check_int("num_classes", num_classes, minimum=2)
    if len(input_widths) < 2:
        raise ValueError(f"The reference classifier fuses two or more modalities; got widths {list(input_widths)}.")
    for i, width in enumerate(input_widths):
        check_int(f"input_widths[{i}]", width)
    gate_weights = _per_modality("gate_weight", gate_weight, len(input_widths))
    confidence_weights = _per_modality("confidence_weight", confidence_weight, len(input_widths))
    if isinstance(kernel_initializer, keras.initializers.Initializer):
        kernel_initializer = keras.initializers.serialize(kernel_initializer)

    def initializer():
        # A new object per layer: one unseeded instance shared by layers of one shape
        # would give them all the same kernel.
        return keras.initializers.get(kernel_initializer)

    inputs, present, features = _modality_inputs(input_widths, input_names, standardize_with, scaling=scaling)
    encoded = []
    for i, (raw, x) in enumerate(zip(present, features)):
        x = FeatureGate(gate_weights[i], kernel_initializer=initializer(), name=f"feature_gate_{i}")(x)
        h = keras.layers.Dense(units, activation="relu", kernel_initializer=initializer(), name=f"encoder_{i}")(x)
        h = PropagateNonFinite(name=f"non_finite_{i}")([h, raw])
        if dropout:
            h = keras.layers.Dropout(dropout, name=f"encoder_dropout_{i}")(h)
        encoded.append(ConfidenceHead(num_classes, confidence_weights[i], kernel_initializer=kernel_initializer,
                                      name=f"confidence_{i}")(h))
    fused = DEQFusion(**{"units": units, **(fusion_options or {})}, name="deq_fusion")(encoded)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=initializer(),
                                 name="probabilities", dtype=_head_dtype())(fused)
    return ReferenceClassifier(inputs, outputs, name="reference_classifier")
