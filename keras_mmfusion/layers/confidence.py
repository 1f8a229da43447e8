"""True-class-probability confidence heads (Han et al., "Multimodal Dynamics", CVPR 2022)."""

import contextlib
import threading

import keras
from keras import ops

from keras_mmfusion.equilibrium.iteration import internal_dtype
from keras_mmfusion._checks import check_int, check_non_negative

# The labels of the enclosing training_labels block, per thread, as Keras keeps its own
# call context, so that a block on one thread does not reach a model run by another.
_LABELS = threading.local()


@contextlib.contextmanager
def training_labels(labels):
    """Make ``labels`` (integer class labels of the batch) visible to every
    :class:`ConfidenceHead` called inside the block.

    :class:`keras_mmfusion.models.ReferenceClassifier` wraps its training step in this,
    so that ``model.fit(x, y)`` trains the confidence heads; a custom training loop
    does the same around its forward pass.

    The labels travel in this scope because Keras 3 has no public route from the
    training step to a layer inside a functional model. ``fit`` runs ``train_step``,
    which calls the model as ``self(x, training=True)``; a functional model passes its
    layers only ``training`` (and masks), and further call-context arguments are
    registered with the private ``Layer._register_call_context_args`` and are not
    passed by ``fit`` anyway (keras-team/keras#21530). ``Model.compute_loss(x, y,
    y_pred, ...)`` sees the model's outputs, not the encoding and confidence of this
    forward pass, and recomputing them from ``x`` would draw new dropout masks. Labels
    as a model input (Keras's endpoint-layer pattern) would make prediction, saving
    and export take labels too.
    """
    previous = getattr(_LABELS, "labels", None)
    _LABELS.labels = labels
    try:
        yield
    finally:
        _LABELS.labels = previous


@keras.saving.register_keras_serializable(package="keras_mmfusion")
class ConfidenceHead(keras.layers.Layer):
    """A modality's classifier and its confidence, which scales the modality's encoding.

    A ``Dense(num_classes)`` classifier and a ``Dense(1)`` confidence read the encoding
    ``h``; the layer returns ``h * confidence``. In training the confidence is regressed
    onto the classifier's softmax probability of the true class (the true-class
    probability of Multimodal Dynamics), and the classifier is trained with
    cross-entropy: ``loss_weight * (mean((c - p_true)^2) + mean(CE(logits, y)))`` is added
    with ``add_loss`` and logged as ``<name>_loss``. The labels come from the enclosing
    :func:`training_labels` block; a training call without one raises a ``ValueError``.

    Args:
        num_classes: the number of classes, at least 2.
        loss_weight: the weight of the head's loss.
        kernel_initializer: initializer of both ``Dense`` kernels (a name, a config or
            an initializer; each ``Dense`` gets its own copy). Glorot normal by default,
            as in the reference code.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        ``(batch, units)``.

    Output shape:
        ``(batch, units)``.

    Example:

    >>> import numpy as np
    >>> ConfidenceHead(num_classes=3)(np.ones((2, 8), "float32")).shape
    TensorShape([2, 8])
    """

    def __init__(self, num_classes, loss_weight=1.0, kernel_initializer="glorot_normal", **kwargs):
        super().__init__(**kwargs)
        check_int("num_classes", num_classes, minimum=2)
        check_non_negative("loss_weight", loss_weight)
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        # Kept as a name or config, so that each Dense deserialises its own initializer
        # (an unseeded one then draws its own seed) when the head is built.
        if isinstance(kernel_initializer, keras.initializers.Initializer):
            kernel_initializer = keras.initializers.serialize(kernel_initializer)
        self.kernel_initializer = kernel_initializer
        self.head_loss = keras.metrics.Mean(name=f"{self.name}_loss")

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"ConfidenceHead '{self.name}' reads (batch, units) encodings; got an input of shape "
                f"{tuple(input_shape)}."
            )
        self.classifier = keras.layers.Dense(
            self.num_classes, kernel_initializer=keras.initializers.get(self.kernel_initializer), name="classifier",
            dtype=self.dtype_policy,
        )
        self.confidence = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.get(self.kernel_initializer), name="confidence",
            dtype=self.dtype_policy,
        )
        self.classifier.build(input_shape)
        self.confidence.build(input_shape)

    def call(self, h, training=None):
        confidence = self.confidence(h)
        if training:
            labels = getattr(_LABELS, "labels", None)
            if labels is None:
                raise ValueError(
                    f"ConfidenceHead '{self.name}' needs the batch's labels in training, to regress its "
                    "confidence onto the true-class probability: train it inside "
                    "keras_mmfusion.models.ReferenceClassifier, or call the model inside "
                    "keras_mmfusion.layers.confidence.training_labels(y)."
                )
            labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
            # float32 under mixed precision, float64 in a float64 model.
            dtype = internal_dtype(self.compute_dtype)
            logits = ops.cast(self.classifier(h), dtype)
            true_class = ops.one_hot(labels, self.num_classes, dtype=dtype)
            p_true = ops.sum(ops.softmax(logits) * true_class, axis=-1)
            regression = ops.mean(ops.square(ops.cast(confidence[:, 0], dtype) - p_true))
            cross_entropy = ops.mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
            loss = regression + cross_entropy
            self.head_loss.update_state(loss)
            self.add_loss(self.loss_weight * loss)
        return h * confidence

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes, loss_weight=self.loss_weight, kernel_initializer=self.kernel_initializer
        )
        return config
